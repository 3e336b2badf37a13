"""Evaluation against direct computations from logits; baselines meet their budget."""

import math

import pytest
import torch
from conftest import tiny_bert, tiny_llama

from flexrank.compress.evaluate import (
    EvaluationError,
    cosine_similarity,
    perplexity,
    teacher_agreement,
    windows,
)
from flexrank.planning.baselines import uniform_ranks
from flexrank.planning.costs import gauge_fixed_params


def direct_nll(model, ids):
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[None]).logits[0], -1)
    return -logp[:-1].gather(-1, ids[1:, None]).squeeze(-1)


def test_windows_score_every_token_once():
    ids = torch.arange(50)
    for seq_len, stride in [(16, 16), (16, 5), (50, 50), (64, 10), (7, 1)]:
        scored = []
        for w in windows(ids, seq_len, stride):
            assert len(w.input_ids) <= seq_len
            scored += w.input_ids[w.score_from:].tolist()
        assert scored == list(range(1, 50)), (seq_len, stride)


def test_perplexity_equals_direct_computation():
    model = tiny_llama(init_std=0.2)
    ids = torch.randint(3, 100, (40,), generator=torch.Generator().manual_seed(0))
    whole = math.exp(float(direct_nll(model, ids).mean()))
    assert perplexity(model, ids, seq_len=64) == pytest.approx(whole, rel=1e-5)
    strided = perplexity(model, ids, seq_len=10, stride=10)
    assert strided != pytest.approx(whole, rel=1e-6)  # less context than the whole text
    nll, n = 0.0, 0
    for w in windows(ids, 10, 10):
        losses = direct_nll(model, w.input_ids)[w.score_from - 1:]
        nll, n = nll + float(losses.sum()), n + losses.numel()
    assert n == 39 and strided == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_teacher_agreement_self_and_other():
    model, other = tiny_llama(init_std=0.2), tiny_llama(seed=1, init_std=0.2)
    ids = torch.randint(3, 100, (30,), generator=torch.Generator().manual_seed(1))
    same = teacher_agreement(model, model, ids, seq_len=16)
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["top1"] == 1.0
    diff = teacher_agreement(other, model, ids, seq_len=64)
    with torch.no_grad():
        t = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1], -1)
        s = torch.log_softmax(other(input_ids=ids[None]).logits[0, :-1], -1)
    assert diff["kl"] == pytest.approx(float((t.exp() * (t - s)).sum(-1).mean()), rel=1e-5)
    assert diff["top1"] == pytest.approx(float((t.argmax(-1) == s.argmax(-1)).float().mean()))


def test_bad_input_and_encoders():
    model = tiny_llama()
    with pytest.raises(EvaluationError, match="stride"):
        list(windows(torch.arange(5), 4, 5))
    bert = tiny_bert()
    with pytest.raises(EvaluationError, match="no logits"):
        perplexity(bert, torch.arange(3, 20))
    batches = [{"input_ids": torch.randint(3, 100, (2, 8)),
                "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
    assert cosine_similarity(bert, bert, batches) == pytest.approx(1.0, abs=1e-6)
    assert perplexity(model, torch.arange(3, 10), seq_len=4) > 1


def test_uniform_ranks_meet_budget_and_are_maximal():
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)] * 3
    dense = sum(m * n for m, n in shapes)
    for beta in (0.9, 0.8, 0.6, 0.4):
        ranks = uniform_ranks(shapes, beta)
        used = sum(gauge_fixed_params(m, n, r) for (m, n), r in zip(shapes, ranks, strict=True))
        assert used <= beta * dense
        assert used > (beta - 0.02) * dense  # within a rank step of the budget
    assert uniform_ranks(shapes, 1.0) == [min(s) for s in shapes]
    assert all(r % 8 == 0 for r in uniform_ranks(shapes, 0.5, multiple=8))


def test_bundle_eval_equals_pytorch_eval(tmp_path):
    from elastic_fixtures import tiny_elastic

    from flexrank.compress.elastic import ElasticModel
    from flexrank.compress.evaluate import evaluate_elastic, evaluate_models
    from flexrank.exporters import export
    from flexrank.exporters.onnx.bundle import bundle_decoders

    student, teacher, plan, _, _ = tiny_elastic(seed=11)
    em = ElasticModel(student, plan, model_id="tiny")
    ids = torch.randint(3, 100, (48,), generator=torch.Generator().manual_seed(2))
    export(em, tmp_path / "dist", budgets=[0.6, 1.0])
    from_bundle = evaluate_models(bundle_decoders(tmp_path / "dist"), teacher, ids, seq_len=32)
    from_torch = evaluate_elastic(em, teacher, ids, budgets=[0.6, 1.0], seq_len=32)
    assert set(from_bundle) == {0.6, 1.0}
    for beta in (0.6, 1.0):
        assert from_bundle[beta]["ppl"] == pytest.approx(from_torch[beta]["ppl"], rel=1e-4)
        assert from_bundle[beta]["top1"] == pytest.approx(from_torch[beta]["top1"], abs=0.03)
    with pytest.raises(EvaluationError, match="none of the budgets"):
        bundle_decoders(tmp_path / "dist", budgets=[0.8])


def test_cli_eval_elastic_and_bundle(tmp_path, capsys):
    from conftest import char_tokenizer
    from elastic_fixtures import tiny_elastic

    from flexrank.cli import main
    from flexrank.compress.elastic import ElasticModel
    from flexrank.exporters import export

    student, teacher, plan, _, _ = tiny_elastic(seed=12)
    em = ElasticModel(student, plan, char_tokenizer(), model_id="not-a-model")
    em.save_pretrained(tmp_path / "elastic")
    export(em, tmp_path / "dist", budgets=[0.6])
    text = tmp_path / "t.txt"
    text.write_text("".join(f"{i} the quick brown fox jumps over the lazy dog\n"
                            for i in range(20)))
    assert main(["eval", str(tmp_path / "elastic"), "--text", str(text), "--seq-len", "32",
                 "--max-tokens", "200"]) == 0
    torch_out = capsys.readouterr().out
    assert main(["eval", str(tmp_path / "dist"), "--text", str(text), "--seq-len", "32",
                 "--max-tokens", "200", "--no-teacher"]) == 0
    bundle_out = capsys.readouterr().out
    ppl = {line.split()[0]: float(line.split()[1]) for out in (torch_out,)
           for line in out.splitlines() if line.strip().startswith("0.6")}
    bundle_ppl = float(next(line.split()[1] for line in bundle_out.splitlines()
                            if line.strip().startswith("0.6")))
    assert bundle_ppl == pytest.approx(ppl["0.6"], rel=1e-3)
    empty = tmp_path / "empty.txt"
    empty.write_text(" ")
    assert main(["eval", str(tmp_path / "elastic"), "--text", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err
