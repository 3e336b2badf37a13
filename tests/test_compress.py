"""`flexrank compress` end to end on a tiny model: stages cached, resume, clear errors."""

import json

import pytest
import torch
from conftest import char_tokenizer, tiny_llama

from flexrank.cli import main
from flexrank.compress.config import CompressConfig, DistillConfig, ProbeConfig
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.pipeline import STATE_FILE, CompressError, compress


@pytest.fixture
def model_dir(tmp_path):
    model = tiny_llama(init_std=0.2)
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("".join(f"{i} the quick brown fox jumps over the lazy dog\n"
                            for i in range(400)))
    return tmp_path / "model", text


def config(text, steps=6):
    return CompressConfig(calib=str(text), num_samples=16, seq_len=32, eval_samples=4,
                          batch_size=4, budgets=(1.0, 0.7),
                          probe=ProbeConfig(mode="fast", num_levels=4, probe_points=2),
                          probe_samples=2, distill=DistillConfig(steps=steps, batch_size=4))


def test_compress_runs_every_stage_and_resumes(model_dir, tmp_path):
    model, text = model_dir
    out = tmp_path / "out"
    elastic, summary = compress(model, out, config(text))
    state = json.loads((out / STATE_FILE).read_text())
    assert list(state["done"]) == ["calibration", "covariance", "decompose", "probe", "plan",
                                   "distill", "save"]
    assert "0.7" in summary and (out / "rank-heatmap.png").stat().st_size > 1000
    loaded = ElasticModel.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        for beta in (0.7, 1.0):
            torch.testing.assert_close(loaded.set_budget(beta).model(ids).logits,
                                       elastic.set_budget(beta).model(ids).logits)
    # a re-run with more steps resumes: earlier stages are not recomputed
    before = {k: v["seconds"] for k, v in state["done"].items()}
    compress(model, out, config(text, steps=10))
    state = json.loads((out / STATE_FILE).read_text())
    for stage in ("calibration", "covariance", "decompose", "probe", "plan"):
        assert state["done"][stage]["seconds"] == before[stage]
    meta = json.loads((out / "stages" / "checkpoint" / "state.json").read_text())
    assert meta["step"] == 10


def test_compress_refuses_foreign_or_incompatible_folder(model_dir, tmp_path):
    model, text = model_dir
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CompressError, match="not empty and is not a FlexRank"):
        compress(model, foreign, config(text))
    out = tmp_path / "out"
    compress(model, out, config(text, steps=2))
    other = CompressConfig(**{**config(text, steps=2).__dict__, "budgets": (1.0, 0.5)})
    with pytest.raises(CompressError, match="differs in: budgets"):
        compress(model, out, other)


def test_cli_compress_and_too_little_text(model_dir, tmp_path, capsys):
    model, text = model_dir
    short = tmp_path / "short.txt"
    short.write_text("too short")
    rc = main(["compress", str(model), "-o", str(tmp_path / "o"), "--calib", str(short),
               "--samples", "8", "--seq-len", "32"])
    assert rc == 2 and "need" in capsys.readouterr().err
    rc = main(["compress", str(model), "-o", str(tmp_path / "o2"), "--calib", str(text),
               "--samples", "8", "--seq-len", "32", "--eval-samples", "2", "--budgets",
               "1,0.7", "--levels", "4", "--probe-samples", "2", "--steps", "2"])
    assert rc == 0 and "whole-model params" in capsys.readouterr().out


def test_a_folder_distilled_before_anchoring_resumes_and_is_anchored(model_dir, tmp_path):
    """full_budget 'anchor' trains as 'train' did (folders from before it): such a folder
    resumes instead of refusing the changed setting, and its β = 1 is then refit."""
    from dataclasses import replace

    model, text = model_dir
    out = tmp_path / "out"
    old = config(text, steps=4)
    old = replace(old, distill=replace(old.distill, full_budget="train", lr=1e-3))
    trained, _ = compress(model, out, old)
    ids = torch.tensor([char_tokenizer()("17 the quick brown fox jumps")["input_ids"]])
    original = tiny_llama(init_std=0.2)
    with torch.no_grad():
        reference = original(ids).logits
        drift = (trained.set_budget(1.0).model(ids).logits - reference).abs().max()
    anchored, _ = compress(model, out, replace(old, distill=replace(old.distill,
                                                                    full_budget="anchor")))
    with torch.no_grad():
        after = (anchored.set_budget(1.0).model(ids).logits - reference).abs().max()
    assert after < 0.8 * drift, (float(drift), float(after))  # 0.30 against 0.48 when written
    with pytest.raises(CompressError, match="differs in: distill"):  # 'refit' trains otherwise
        compress(model, out, replace(old, distill=replace(old.distill, full_budget="refit")))


def test_a_finished_run_is_loaded_not_run_again(model_dir, tmp_path, monkeypatch):
    """A second run with the same settings returns the saved checkpoint without loading
    the model or distilling; more steps (left out of the resume signature) train on."""
    import flexrank.compress.pipeline as pipeline

    model, text = model_dir
    out = tmp_path / "out"
    first, summary = compress(model, out, config(text, steps=2))
    # off (the default), balance_factors is not recorded: folders that finished before it
    # was a setting are loaded too
    saved = json.loads((out / STATE_FILE).read_text())["done"]["save"]["distill"]
    assert "balance_factors" not in saved and saved["steps"] == 2
    calls = []
    real_distill = pipeline.distill
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: calls.append("load") or
                        pytest.fail("a finished run loaded the model again"))
    again, summary_again = compress(model, out, config(text, steps=2))
    assert summary_again == summary and not calls
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        for beta in (0.7, 1.0):
            torch.testing.assert_close(again.set_budget(beta).model(ids).logits,
                                       first.set_budget(beta).model(ids).logits)
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "distill", lambda *a, **k: calls.append("distill") or
                        real_distill(*a, **k))
    compress(model, out, config(text, steps=3))
    assert calls == ["distill"]
    meta = json.loads((out / "stages" / "checkpoint" / "state.json").read_text())
    assert meta["step"] == 3
