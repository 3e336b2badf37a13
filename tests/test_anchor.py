"""The full budget is anchored to the original model (issue 17): the closed-form pieces
against numpy's float64 linear algebra, and distillation on a tiny model, where β = 1
trained like the other budgets drifts from the original and anchored it does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from elastic_fixtures import tiny_elastic

from flexrank.compress.anchor import refit_tail, solve_other_factor
from flexrank.compress.config import DistillConfig
from flexrank.compress.decompose import Whitening
from flexrank.compress.distill import budgets_for_step, distill
from flexrank.compress.select import nested_layers


def random_problem(m=8, n=6, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((m, n))
    X = rng.standard_normal((40, n)) @ rng.standard_normal((n, n))  # correlated inputs
    cov = X.T @ X
    U, V = rng.standard_normal((m, min(m, n))), rng.standard_normal((n, min(m, n)))
    return W, cov, U, V


@torch.no_grad()
def full_rank_logits(model, ids):
    """Set every nested layer of `model` to its maximal rank (β = 1); its logits then."""
    for layer in nested_layers(model).values():
        layer.rank = layer.max_rank
    return model(ids).logits


def whitened_error(W, U, V, cov):
    """Σ_x ‖(W − U Vᵀ) x‖² = tr(D Σ Dᵀ)."""
    D = W - U @ V.T
    return float(np.trace(D @ cov @ D.T))


@pytest.mark.parametrize("keep", [0, 2, 4])
def test_refit_tail_is_the_best_tail_in_the_data_norm(keep):
    """Eckart–Young in the whitened norm, computed with numpy: the best rank-t fit of
    (W − P) S is its truncated SVD, mapped back by S⁻¹ (S = Σ^½ by eigh)."""
    W, cov, U, V = random_problem()
    tail_U, tail_V = refit_tail(torch.from_numpy(W), torch.from_numpy(U), torch.from_numpy(V),
                                keep, Whitening.of(torch.from_numpy(cov)))
    R = U.shape[1]
    assert tail_U.shape == (8, R - keep) and tail_V.shape == (6, R - keep)
    lam, Q = np.linalg.eigh(cov)
    S, S_inv = (Q * np.sqrt(lam)) @ Q.T, (Q / np.sqrt(lam)) @ Q.T
    P, sigma, Rt = np.linalg.svd((W - U[:, :keep] @ V[:, :keep].T) @ S)
    t = R - keep
    best = U[:, :keep] @ V[:, :keep].T + (P[:, :t] * sigma[:t]) @ Rt[:t] @ S_inv
    ours = U[:, :keep] @ V[:, :keep].T + tail_U.numpy() @ tail_V.numpy().T
    np.testing.assert_allclose(ours, best, atol=1e-9)
    assert whitened_error(W, np.hstack([U[:, :keep], tail_U.numpy()]),
                          np.hstack([V[:, :keep], tail_V.numpy()]), cov) == pytest.approx(
        float((sigma[t:] ** 2).sum()), rel=1e-9)
    if keep == 0:  # nothing fixed: the full rank reproduces W
        np.testing.assert_allclose(ours, W, atol=1e-9)


@pytest.mark.parametrize("shape", [(8, 6), (6, 8), (6, 6)])
def test_solve_other_factor_reproduces_w_and_keeps_the_square_factor(shape):
    m, n = shape
    W, _, U, V = random_problem(m, n, seed=1)
    new_U, new_V = solve_other_factor(*(torch.from_numpy(a) for a in (W, U, V)))
    np.testing.assert_allclose(new_U.numpy() @ new_V.numpy().T, W, atol=1e-10)
    if n <= m:
        np.testing.assert_array_equal(new_V.numpy(), V)
    else:
        np.testing.assert_array_equal(new_U.numpy(), U)
    with pytest.raises(ValueError, match="not the full-rank factors"):
        solve_other_factor(torch.from_numpy(W), torch.from_numpy(U[:, :2]),
                           torch.from_numpy(V[:, :2]))


def test_a_refit_only_full_budget_is_not_trained():
    cfg = DistillConfig(sampler="sandwich", seed=3)
    for step in range(20):
        assert budgets_for_step([0.4, 0.6, 0.8, 1.0], cfg, step, trained=3)[::2] == [2, 0]
    with pytest.raises(ValueError, match="weigh only the full budget"):
        budgets_for_step([0.5, 1.0], DistillConfig(sampler="weighted",
                                                   budget_weights=(0, 1)), 0, trained=1)


def held_out_kl(full_budget: str) -> tuple[dict, dict]:
    student, teacher, plan, train, held_out = tiny_elastic(budgets=[0.4, 0.6, 1.0])
    config = DistillConfig(steps=60, lr=1e-3, warmup_steps=5, batch_size=8,
                           full_budget=full_budget)
    result = distill(student, teacher, plan, train, config, eval_batches=held_out,
                     progress=False)
    assert (result.anchor is None) == (full_budget == "train")
    return result.evals[0]["budgets"], result.evals[-1]["budgets"]


def test_distillation_keeps_the_full_budget_nearer_the_original_model():
    """Trained like the other budgets at a high learning rate, β = 1 moves away from the
    original (the behaviour issue 17 reports: KL 0.063 here); anchored (refit to the
    original weights after training) it stays at 0.037 (measured when written) while the
    smaller budgets still improve. Held-out KL to the original, independent of the refit's
    own report. A random tiny model's perplexity says little; its KL is the measure."""
    before, trained = held_out_kl("train")
    _, anchored = held_out_kl("anchor")
    assert trained[1.0]["kl"] > 0.05, trained  # the old behaviour: β = 1 drifts
    assert anchored[1.0]["kl"] < 0.045 and anchored[1.0]["kl"] < 0.7 * trained[1.0]["kl"], \
        (anchored, trained)
    for beta in (0.4, 0.6):
        assert anchored[beta]["kl"] < 0.9 * before[beta]["kl"], (beta, before, anchored)


def test_no_step_no_refit():
    """`steps=0` (compress without distillation) changes no factor and runs no refit: the
    DataSVD factors at full rank already give the original model's logits."""
    student, teacher, plan, train, held_out = tiny_elastic(budgets=[0.4, 1.0])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = distill(student, teacher, plan, train,
                     DistillConfig(steps=0, full_budget="anchor"), progress=False)
    assert result.anchor is None
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    ids = held_out[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(full_rank_logits(student, ids), teacher(ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_a_resumed_trained_checkpoint_is_refit_with_no_new_step(tmp_path):
    """steps=0 on a folder whose checkpoint holds trained factors (a rerun with --steps 0):
    those factors are loaded, and the full budget is still refit to the original."""
    student, teacher, plan, train, _ = tiny_elastic(budgets=[0.4, 1.0])
    config = DistillConfig(steps=3, lr=1e-2, warmup_steps=0, batch_size=4,
                           full_budget="anchor")
    distill(student, teacher, plan, train, config, output_dir=tmp_path, progress=False)
    again, *_ = tiny_elastic(budgets=[0.4, 1.0])
    result = distill(again, teacher, plan, train, DistillConfig(
        steps=0, batch_size=4, full_budget="anchor"), output_dir=tmp_path, progress=False)
    assert result.steps_done == 3 and result.anchor is not None
    # its full budget is the first run's, which was refit after its 3 steps, not the
    # trained checkpoint's
    ids = train[0]["input_ids"]
    torch.testing.assert_close(full_rank_logits(again, ids), full_rank_logits(student, ids),
                               atol=1e-5, rtol=1e-5)
