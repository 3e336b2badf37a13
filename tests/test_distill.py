"""Nested elastic distillation and the elastic checkpoint."""

import copy
import importlib
import math

import pytest
import torch
from elastic_fixtures import BUDGETS, tiny_elastic

from flexrank.compress.config import DistillConfig
from flexrank.compress.distill import (
    batch_indices,
    budgets_for_step,
    distill,
    distill_loss,
    evaluate_budgets,
    lr_factor,
)
from flexrank.compress.elastic import BudgetError, ElasticModel
from flexrank.compress.select import nested_layers


def test_distill_loss_is_token_mean_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    p, q = t.softmax(-1), s.softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1)
    expected = (kl * mask).sum() / mask.sum()
    torch.testing.assert_close(distill_loss(s, t, mask), expected)
    T = 2.0
    p, q = (t / T).softmax(-1), (s / T).softmax(-1)
    expected_t = (p * (p.log() - q.log())).sum(-1).mean() * T**2
    torch.testing.assert_close(distill_loss(s, t, None, T), expected_t)


def test_samplers_schedule_and_batches():
    cfg = DistillConfig(sampler="sandwich", seed=1)
    for step in range(20):
        chosen = budgets_for_step([0.4, 0.6, 0.8, 1.0], cfg, step)
        assert chosen[0] == 3 and chosen[-1] == 0 and len(chosen) == 3
    uniform = [budgets_for_step([0.5, 1.0], DistillConfig(sampler="uniform", seed=2), s)[0]
               for s in range(400)]
    assert 150 < sum(uniform) < 250
    weighted = DistillConfig(sampler="weighted", budget_weights=(0.0, 1.0))
    assert all(budgets_for_step([0.5, 1.0], weighted, s) == [1] for s in range(20))
    # sandwich with weights: the middle budget is never one of weight 0
    budgets = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    cfg = DistillConfig(sampler="sandwich", budget_weights=(1, 0, 1, 0, 3, 0, 1))
    middles = [budgets_for_step(budgets, cfg, s)[1] for s in range(400)]
    assert set(middles) == {2, 4} and 230 < middles.count(4) < 370  # p(0.8) = 3/4
    assert all(budgets_for_step(budgets, cfg, s)[::2] == [6, 0] for s in range(20))
    cfg = DistillConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(110, cfg) == pytest.approx(0.1)
    epoch = [batch_indices(12, DistillConfig(batch_size=4), s) for s in range(3)]
    assert sorted(int(i) for b in epoch for i in b) == list(range(12))
    with pytest.raises(ValueError, match="sampler 'weighted' needs budget_weights"):
        DistillConfig(sampler="weighted")


def test_distillation_lowers_heldout_kl_at_every_budget():
    student, teacher, plan, train, held_out = tiny_elastic()
    result = distill(student, teacher, plan, train,
                     DistillConfig(steps=200, lr=3e-4, warmup_steps=10, batch_size=8),
                     eval_batches=held_out, progress=False)
    before, after = result.evals[0]["budgets"], result.evals[-1]["budgets"]
    assert result.steps_done == 200 and result.evals[-1]["step"] == 200
    assert result.tokens_seen == 200 * 8 * 16
    for beta in BUDGETS[:-1]:  # β = 1 starts at KL 0: it can only be held, not improved
        assert after[beta]["kl"] < 0.97 * before[beta]["kl"], (beta, before, after)
    assert all(p.requires_grad is False for p in student.parameters())


def recording_accelerator():
    """Accelerate's CPU accelerator, also recording each loss handed to `backward` with
    the uncertainty weights (`log_vars`, the optimizer's last group) at that moment."""
    from accelerate import Accelerator

    class Recording(Accelerator):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.calls: list[tuple[float, torch.Tensor]] = []

        def prepare(self, *args):
            prepared = super().prepare(*args)
            self.log_vars = prepared[1].param_groups[-1]["params"][0]
            return prepared

        def backward(self, loss, **kwargs):
            self.calls.append((float(loss.detach()), self.log_vars.detach().clone()))
            super().backward(loss, **kwargs)

    return Recording(cpu=not torch.cuda.is_available(), mixed_precision="no")


def test_uncertainty_weights_run_and_train():
    """The weighted loss is Kendall et al. 2018's homoscedastic-uncertainty weighting in the
    form distill.py documents (and Nested Subspace Networks use): Σ_k exp(−s_k)·L_k + s_k,
    s_k = log σ_k² learned per budget, each step's sum divided by its number of budgets."""
    student, teacher, plan, train, held_out = tiny_elastic(seed=1)
    config = DistillConfig(steps=100, lr=3e-4, warmup_steps=10, batch_size=8,
                           sampler="sandwich", uncertainty_weights=True)
    accelerator = recording_accelerator()
    result = distill(student, teacher, plan, train, config, eval_batches=held_out,
                     accelerator=accelerator, progress=False)
    before, after = result.evals[0]["budgets"], result.evals[-1]["budgets"]
    assert after[0.6]["kl"] < before[0.6]["kl"]

    # every loss backpropagated, against the formula from the step's raw budget losses
    calls = iter(accelerator.calls)
    s_at_step, grads = [], []  # s before each step; ∂(step loss)/∂s_k by hand
    for step, raw in enumerate(result.losses):
        chosen = budgets_for_step(plan.budgets, config, step)
        grad = torch.zeros(len(plan.budgets), dtype=torch.float64)
        for k in chosen:
            value, s = next(calls)
            L, s_k = raw[plan.budgets[k]], float(s[k])
            assert value == pytest.approx((math.exp(-s_k) * L + s_k) / len(chosen), rel=1e-5)
            grad[k] += (1 - math.exp(-s_k) * L) / len(chosen)
        s_at_step.append(s.double())
        grads.append(grad)
    assert next(calls, None) is None
    s_at_step.append(accelerator.log_vars.detach().double())  # after the last step
    assert len(s_at_step) == config.steps + 1 and torch.all(s_at_step[0] == 0)

    # Adam's first step moves each s_k by lr·lr_factor(0) against the sign of its gradient
    first_lr = config.lr * lr_factor(0, config)
    torch.testing.assert_close(s_at_step[1] - s_at_step[0], -first_lr * grads[0].sign(),
                               rtol=1e-4, atol=1e-9)
    # and, for a budget whose gradient kept one sign throughout, every later step as well
    signs = torch.stack(grads).sign()  # (steps, budgets)
    moves = torch.diff(torch.stack(s_at_step), dim=0)  # (steps, budgets)
    steady = (signs == signs[0]).all(0) & (signs[0] != 0)
    assert steady.any(), signs
    assert torch.all(moves[:, steady].sign() == -signs[0, steady])


def test_interrupt_and_resume_is_bit_identical(tmp_path):
    config = DistillConfig(steps=8, lr=1e-3, warmup_steps=2, checkpoint_every=3)
    student, teacher, plan, train, _ = tiny_elastic(seed=2)
    reference = copy.deepcopy(student)
    distill(reference, teacher, plan, train, config, progress=False)

    module = importlib.import_module("flexrank.compress.distill")
    real = module.save_checkpoint
    calls = {"n": 0}

    def crash_after_second(*args, **kwargs):
        real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # checkpoint at step 6 written, then the run dies
            raise KeyboardInterrupt

    module.save_checkpoint = crash_after_second
    try:
        with pytest.raises(KeyboardInterrupt):
            distill(student, teacher, plan, train, config, output_dir=tmp_path, progress=False)
    finally:
        module.save_checkpoint = real
    resumed = copy.deepcopy(student)  # carries the crashed run's weights; resume must overwrite
    result = distill(resumed, teacher, plan, train, config, output_dir=tmp_path, progress=False)
    assert result.steps_done == 8
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_elastic_save_load_identical_logits_every_budget(tmp_path, tokenizer):
    student, teacher, plan, train, _ = tiny_elastic(seed=3)
    em = ElasticModel(student, plan, tokenizer, model_id="tiny-llama")
    ids = train[0]
    reference = {}
    with torch.no_grad():
        for beta in plan.budgets:
            reference[beta] = em.set_budget(beta).model(**ids).logits
    em.save_pretrained(tmp_path / "elastic")
    loaded = ElasticModel.from_pretrained(tmp_path / "elastic")
    assert loaded.model_id == "tiny-llama" and loaded.tokenizer is not None
    assert loaded.budgets == em.budgets
    with torch.no_grad():
        for beta in plan.budgets:
            assert torch.equal(loaded.set_budget(beta).model(**ids).logits, reference[beta])
    loaded.set_budget(0.6)
    out = loaded.model.generate(ids["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    with pytest.raises(BudgetError, match=r"budget 0.7 is not one of the plan's budgets"):
        loaded.set_budget(0.7)


def test_elastic_checkpoint_errors(tmp_path):
    student, _, plan, train, _ = tiny_elastic(seed=4)
    em = ElasticModel(student, plan)
    em.save_pretrained(tmp_path / "e")
    weights = tmp_path / "e" / "flexrank-elastic.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="flexrank-elastic.safetensors"):
        ElasticModel.from_pretrained(tmp_path / "e")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="not a complete"):
        ElasticModel.from_pretrained(tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="not a FlexRank elastic checkpoint"):
        ElasticModel.from_pretrained(tmp_path)


def test_evaluate_budgets_matches_direct_perplexity():
    student, teacher, plan, train, held_out = tiny_elastic(seed=5)
    em = ElasticModel(student, plan)
    results = evaluate_budgets(em, teacher, held_out)
    em.set_budget(1.0)
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in held_out:
            logits = student(**b).logits
            logp = torch.log_softmax(logits[:, :-1], -1)
            nll -= float(logp.gather(-1, b["input_ids"][:, 1:, None]).sum())
            count += b["input_ids"][:, 1:].numel()
    assert results[1.0]["ppl"] == pytest.approx(float(torch.exp(torch.tensor(nll / count))),
                                                rel=1e-5)
    assert all(r == layer.max_rank for r, layer in zip(plan.ranks[-1], em.layers.values(),
                                                       strict=True))
    assert results[1.0]["kl"] < 1e-6 < results[0.6]["kl"]


def test_distill_leaves_the_student_frozen_in_eval_at_its_largest_budget():
    """What `distill` documents that it mutates, against the state before the call."""
    student, teacher, plan, train, _ = tiny_elastic(seed=6, budgets=[0.6, 0.8])
    layers = nested_layers(student)
    for layer in layers.values():  # a state that distill must not keep
        layer.rank = 1
    student.train().requires_grad_(True)
    teacher.train().requires_grad_(True)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    distill(student, teacher, plan, train[:4], DistillConfig(steps=2, lr=1e-3, batch_size=4),
            progress=False)
    largest = dict(zip(plan.layer_names, plan.ranks[-1], strict=True))  # plan: ascending
    expected = {name: largest.get(name, layer.U.shape[1]) for name, layer in layers.items()}
    assert any(expected[name] < layer.U.shape[1] for name, layer in layers.items())
    assert {name: layer.rank for name, layer in layers.items()} == expected
    assert not any(m.training for m in student.modules())
    assert not any(p.requires_grad for p in student.parameters())
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    trained = {f"{name}.{p}" for name, layer in layers.items() for p, _ in layer.named_parameters()}
    for name, p in student.named_parameters():  # only the nested layers' parameters moved
        assert torch.equal(p, before[name]) == (name not in trained), name
