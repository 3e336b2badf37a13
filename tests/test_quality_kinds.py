"""Quality for `--budget auto` by model kind (issue 19): an encoder's mean cosine of the
pooled embedding to the original's (and the feature loss), a classifier's top-1 agreement
with the original and class KL, stored in flexrank-quality.json like an LM's perplexity,
and the decision choosing by them.

References are independent of flexrank.compress.objectives: float64 NumPy on the outputs
of the PyTorch models themselves (mean pooling, cosine, log-softmax and KL written out),
and test_encoders.feature_reference (float64 loops) for the feature loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_encoders import bert_encoder, elastic_student, feature_reference, vit_classifier

from flexrank.compress.budget_cost import budget_costs
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.quality import QUALITY_FILE, measure_quality, quality_rows
from flexrank.device.decide import Candidate, Constraints, Quality, decide

BATCH = 4  # measure_quality's batch size here


@pytest.fixture(scope="module")
def bert():
    """(elastic, teacher, held-out token ids (12, 10)): DataSVD + plan of a tiny BERT."""
    student, teacher, nested, _, _ = elastic_student(bert_encoder)
    ids = torch.randint(1, 100, (12, 10), generator=torch.Generator().manual_seed(7))
    return ElasticModel(student, nested), teacher, ids


@pytest.fixture(scope="module")
def vit():
    """(elastic, teacher, held-out images (12, 3, 16, 16)) of a tiny ViT classifier."""
    student, teacher, nested, _, _ = elastic_student(vit_classifier)
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    return ElasticModel(student, nested), teacher, images


def stored_folder(tmp_path, samples):
    """A compress-style folder whose stages/ keep `samples` as the held-out set."""
    (tmp_path / "stages").mkdir()
    save_file({"train": samples[:1].clone(), "eval": samples},
              str(tmp_path / "stages" / "calibration.safetensors"))
    (tmp_path / "elastic").mkdir()
    return tmp_path / "elastic"


@torch.no_grad()
def bert_reference(elastic, teacher, ids, beta) -> dict:
    """Mean cosine of mean-pooled embeddings (every token real) and the feature loss per
    batch of BATCH, weighted by inputs, in float64."""
    elastic.set_budget(beta)
    mask = torch.ones_like(ids)
    s = elastic.model(input_ids=ids, attention_mask=mask).last_hidden_state.double().numpy()
    t = teacher(input_ids=ids, attention_mask=mask).last_hidden_state.double().numpy()
    ps, pt = s.mean(1), t.mean(1)
    cosine = np.mean([a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
                      for a, b in zip(ps, pt, strict=True)])
    losses = [feature_reference(s[i:i + BATCH], t[i:i + BATCH], np.ones((BATCH, ids.shape[1])))
              for i in range(0, len(ids), BATCH)]
    return {"cosine": cosine, "loss": float(np.mean(losses))}


@torch.no_grad()
def vit_reference(elastic, teacher, images, beta) -> dict:
    """Top-1 agreement and class KL(original ‖ candidate) per input, in float64."""
    elastic.set_budget(beta)
    s = elastic.model(images).logits.double().numpy()
    t = teacher(images).logits.double().numpy()

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ls, lt = log_softmax(s), log_softmax(t)
    kl = (np.exp(lt) * (lt - ls)).sum(-1).mean()
    return {"top1": float((s.argmax(-1) == t.argmax(-1)).mean()), "kl": float(kl)}


def test_encoder_quality_is_the_cosine_and_feature_loss_stored(bert, tmp_path):
    elastic, teacher, ids = bert
    folder = stored_folder(tmp_path, ids)
    rows, note = quality_rows(elastic, folder, ["fp32", "int8"], lambda: teacher)
    assert "measured now" in note
    stored = json.loads((folder / QUALITY_FILE).read_text())
    assert stored["rows"] == rows and stored["text"]["shape"] == [12, 10]
    assert "cosine" in stored["figures"]["feature"]
    by = {(r["beta"], r["precision"]): r for r in stored["rows"]}
    assert set(by) == {(b, p) for b in elastic.budgets for p in ("fp32", "int8")}
    for beta in elastic.budgets:
        row, ref = by[beta, "fp32"], bert_reference(elastic, teacher, ids, beta)
        assert row["objective"] == "feature" and "ppl" not in row
        assert row["cosine"] == pytest.approx(ref["cosine"], abs=1e-5)
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-6)
        assert by[beta, "int8"]["cosine"] != row["cosine"]  # int8 computed, not copied
    cosines = [by[b, "fp32"]["cosine"] for b in sorted(elastic.budgets)]
    assert cosines[0] < cosines[-1] - 1e-3  # truncation visibly hurts (else the test is idle)
    # read back, not measured again
    again, note = quality_rows(elastic, folder, ["fp32", "int8"], None)
    assert note.startswith("stored") and again == rows


def test_classifier_quality_is_top1_agreement_and_class_kl(vit, tmp_path):
    elastic, teacher, images = vit
    folder = stored_folder(tmp_path, images)
    rows, _ = quality_rows(elastic, folder, ["fp32"], lambda: teacher)
    stored = json.loads((folder / QUALITY_FILE).read_text())
    assert stored["rows"] == rows and stored["text"]["shape"] == [12, 3, 16, 16]
    for row in rows:
        ref = vit_reference(elastic, teacher, images, row["beta"])
        assert row["objective"] == "class_kl"
        assert row["top1"] == pytest.approx(ref["top1"], abs=1e-12)
        assert row["kl"] == pytest.approx(ref["kl"], rel=1e-4, abs=1e-7)
    assert min(r["kl"] for r in rows) < max(r["kl"] for r in rows)


def test_encoder_quality_needs_the_original(bert, tmp_path):
    elastic, _, ids = bert
    with pytest.raises(ValueError, match="distance to the original"):
        measure_quality(elastic, ids, None, ["fp32"])
    rows, note = quality_rows(elastic, stored_folder(tmp_path, ids), ["fp32"], None)
    assert rows == [] and "could not be loaded" in note


def decision(elastic, rows, tolerance):
    costs = budget_costs(elastic)
    by = {r["beta"]: Quality.from_row(r) for r in rows if r["precision"] == "fp32"}
    return decide([Candidate(c, "fp32", by[c.beta]) for c in costs], "pixel8",
                  Constraints(quality_tolerance=tolerance))


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_decision_takes_a_smaller_budget_only_within_the_tolerance(kind, bert, vit):
    elastic, teacher, samples = bert if kind == "bert" else vit
    rows = measure_quality(elastic, samples, teacher, ["fp32"])
    metric = "cosine" if kind == "bert" else "top1"
    value = {r["beta"]: r[metric] for r in rows}
    best = max(value.values())
    smallest = min(value)
    # the best budget: highest cosine / agreement (ties: lower feature loss / class KL)
    strict = decision(elastic, rows, 0.0)
    assert strict.chosen.quality.metric == metric
    assert value[strict.beta] == best
    assert value[smallest] < best  # the tiny models lose quality when truncated
    # a tolerance just wider than the smallest budget's relative loss takes the smallest
    loss = 1 - value[smallest] / best
    wide = decision(elastic, rows, min(0.99, loss * 1.01 + 1e-9))
    assert wide.beta == smallest and wide.chosen.size_mb < strict.chosen.size_mb
    # just narrower: not the smallest
    narrow = decision(elastic, rows, loss * 0.99)
    assert narrow.beta != smallest
    table = strict.table()
    header = "cosine" if kind == "bert" else "top-1"
    assert header in table and f"{value[strict.beta]:.4g}" in table
    assert ("feat. loss" in table) == (kind == "bert")
