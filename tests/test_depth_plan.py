"""Joint depth + rank plan: the exact per-budget optimum equals brute force, every plan is
nested, the nested plan equals the brute-force best nested plan on small cases, files
round-trip (synthetic sensitivities; the probed tiny model is in test_depth.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from flexrank.planning.costs import ParamsCost, cost_matrix
from flexrank.planning.depth import (
    KEPT,
    BlockSensitivity,
    JointPlan,
    joint_plan,
    nesting_problems,
    stand_in_cost,
)
from flexrank.planning.sensitivity import Sensitivity


def synthetic(seed: int, num_blocks: int = 3, layers_per_block: int = 2, levels: int = 3,
              candidates=(0, 2), adapter_ranks=(1, 3)):
    """Random monotone rank errors per layer, random replacement errors per candidate."""
    rng = np.random.default_rng(seed)
    names, shapes, ranks = [], [], []
    for b in range(num_blocks):
        for i in range(layers_per_block):
            m, n = (int(v) for v in rng.integers(levels + 2, 10, size=2))
            below = sorted(rng.choice(np.arange(1, min(m, n)), size=levels - 1, replace=False))
            names.append(f"model.layers.{b}.proj{i}")
            shapes.append((m, n))
            ranks.append([*map(int, below), min(m, n)])
    errors = np.sort(rng.exponential(1.0, size=(len(names), levels)), axis=1)[:, ::-1].copy()
    errors[:, -1] = 0.0
    sens = Sensitivity(names, shapes, np.array(ranks), errors)
    donors = [next(j for j in range(num_blocks) if j not in candidates) for _ in candidates]
    block_errors = np.sort(rng.exponential(1.5, size=(len(candidates), len(adapter_ranks))),
                           axis=1)[:, ::-1]
    depth = BlockSensitivity(
        blocks=[f"model.layers.{b}" for b in range(num_blocks)],
        cosine=rng.random(num_blocks), skip_kl=rng.random(num_blocks),
        candidates=list(candidates), donors=donors, adapter_ranks=list(adapter_ranks),
        errors=block_errors,
        shapes=[[shapes[c * layers_per_block + i] for i in range(layers_per_block)]
                for c in candidates])
    return sens, depth


def group_options(sens, depth):
    """Per block, every choice by enumeration: (cost, error, descriptor) with descriptor
    ('kept', levels tuple) or ('replaced', adapter level)."""
    costs = cost_matrix(ParamsCost(), sens.shapes, sens.ranks)
    per_block = []
    L = len(sens.layer_names) // len(depth.blocks)
    for j in range(len(depth.blocks)):
        layers = range(j * L, (j + 1) * L)
        options = []
        for levels in itertools.product(range(sens.num_levels), repeat=L):
            options.append((sum(costs[i, k] for i, k in zip(layers, levels, strict=True)),
                            sum(sens.errors[i, k] for i, k in zip(layers, levels, strict=True)),
                            ("kept", levels)))
        if j in depth.candidates:
            c = depth.candidates.index(j)
            for k, a in enumerate(depth.adapter_ranks):
                options.append((stand_in_cost(ParamsCost(), depth.shapes[c], int(a)),
                                depth.errors[c, k], ("replaced", k)))
        per_block.append(options)
    return per_block


def all_plans(per_block):
    """Every combination: (P,) costs, (P,) errors, (P, NB) option indices."""
    index = np.array(list(itertools.product(*[range(len(o)) for o in per_block])))
    cost = sum(np.array([o[0] for o in opts])[index[:, j]] for j, opts in enumerate(per_block))
    error = sum(np.array([o[1] for o in opts])[index[:, j]]
                for j, opts in enumerate(per_block))
    return cost, error, index


def budgets_between(per_block, dense, fractions):
    """Budgets spread from the cheapest reachable plan (fraction 0) to 1 (fraction 1)."""
    low = sum(min(o[0] for o in opts) for opts in per_block) / dense
    return [float(np.ceil((low + f * (1 - low)) * 1e6) / 1e6) if f < 1 else 1.0
            for f in fractions]


def nests(small, large) -> bool:
    """Whether a block's choice at a smaller budget nests under its choice at a larger."""
    if large[0] == "replaced":
        return small[0] == "replaced" and small[1] <= large[1]
    if small[0] == "replaced":
        return True
    return all(a <= b for a, b in zip(small[1], large[1], strict=True))


def brute_nested(per_block, caps):
    """The best nested plan over two budgets by enumeration: its summed error."""
    cost, error, index = all_plans(per_block)
    fits = [np.flatnonzero(cost <= cap * (1 + 1e-9)) for cap in caps]
    ok = np.ones((len(fits[0]), len(fits[1])), dtype=bool)
    for j, opts in enumerate(per_block):
        table = np.array([[nests(a[2], b[2]) for b in opts] for a in opts])
        ok &= table[index[fits[0], j][:, None], index[fits[1], j][None, :]]
    total = error[fits[0]][:, None] + error[fits[1]][None, :]
    return float(np.where(ok, total, np.inf).min())


@pytest.mark.parametrize("seed", range(6))
def test_dp_equals_brute_force_and_plan_nests(seed):
    sens, depth = synthetic(seed)
    per_block = group_options(sens, depth)
    cost, error, _ = all_plans(per_block)
    dense = sum(m * n for m, n in sens.shapes)
    budgets = budgets_between(per_block, dense, [0.0, 0.2, 0.5, 1.0])
    plan = joint_plan(sens, depth, budgets=budgets)
    for b, beta in enumerate(budgets):
        best = error[cost <= beta * dense * (1 + 1e-9)].min()
        assert plan.dp_error[b] == pytest.approx(best, abs=1e-12)
        assert plan.predicted_error[b] >= best - 1e-12
        assert plan.cost[b] <= beta * dense * (1 + 1e-9)
    assert not nesting_problems(np.array(plan.ranks), np.array(plan.adapter_ranks))
    assert plan.predicted_error[-1] == pytest.approx(0.0)  # beta = 1: the original model
    assert all(a == KEPT for a in plan.adapter_ranks[-1])


@pytest.mark.parametrize("seed", range(8))
def test_nested_plan_equals_brute_force_nested_optimum(seed):
    sens, depth = synthetic(seed, levels=3)
    per_block = group_options(sens, depth)
    dense = sum(m * n for m, n in sens.shapes)
    budgets = budgets_between(per_block, dense, [0.15, 0.45])
    plan = joint_plan(sens, depth, budgets=budgets)
    reference = brute_nested(per_block, [b * dense for b in budgets])
    assert sum(plan.predicted_error) == pytest.approx(reference, rel=1e-12, abs=1e-12)


def test_predicted_error_and_cost_recomputed_from_the_tables():
    """The plan's figures follow from its own ranks and adapter ranks (not a self-report)."""
    sens, depth = synthetic(3)
    budgets = budgets_between(group_options(sens, depth), sum(m * n for m, n in sens.shapes),
                              [0.1, 0.5, 1.0])
    plan = joint_plan(sens, depth, budgets=budgets)
    costs = cost_matrix(ParamsCost(), sens.shapes, sens.ranks)
    L = 2
    for b in range(len(plan.budgets)):
        error = cost = 0.0
        for j in range(len(depth.blocks)):
            a = plan.adapter_ranks[b][j]
            if a != KEPT:
                c = depth.candidates.index(j)
                k = list(depth.adapter_ranks).index(a)
                error += depth.errors[c, k]
                cost += stand_in_cost(ParamsCost(), depth.shapes[c], a)
                continue
            for i in range(j * L, (j + 1) * L):
                k = list(sens.ranks[i]).index(plan.ranks[b][i])
                error += sens.errors[i, k]
                cost += costs[i, k]
        assert plan.predicted_error[b] == pytest.approx(error)
        assert plan.cost[b] == pytest.approx(cost)
        read = plan.params[b] + sum(  # a replaced block reads its donor's layers again
            ParamsCost()(*sens.shapes[i], plan.ranks[b][i])
            for j, a in enumerate(plan.adapter_ranks[b]) if a != KEPT
            for i in range(plan.donors[j] * L, (plan.donors[j] + 1) * L))
        assert plan.read_params[b] == read


def test_replacement_is_chosen_when_cheap_and_harmless():
    """A candidate whose stand-in costs little and damages nothing is replaced at small
    budgets, and its donor never is."""
    sens, depth = synthetic(0)
    depth = BlockSensitivity(depth.blocks, depth.cosine, depth.skip_kl, depth.candidates,
                             depth.donors, depth.adapter_ranks,
                             np.full_like(depth.errors, 1e-6), depth.shapes)
    low = budgets_between(group_options(sens, depth), sum(m * n for m, n in sens.shapes),
                          [0.3])[0]
    plan = joint_plan(sens, depth, budgets=[low, 1.0])
    replaced = plan.replaced_for(low)
    assert set(replaced) == {"model.layers.0", "model.layers.2"}
    assert all(donor == "model.layers.1" for donor, _ in replaced.values())
    assert plan.replaced_for(1.0) == {}


def test_files_round_trip(tmp_path):
    sens, depth = synthetic(1)
    depth.save(tmp_path / "depth.json")
    again = BlockSensitivity.load(tmp_path / "depth.json")
    np.testing.assert_array_equal(again.errors, depth.errors)
    assert again.donors == depth.donors and again.shapes == depth.shapes
    plan = joint_plan(sens, depth, budgets=[0.8, 1.0])
    plan.save(tmp_path / "plan.json")
    assert JointPlan.load(tmp_path / "plan.json") == plan


def test_refusals_name_the_problem():
    sens, depth = synthetic(0)
    with pytest.raises(ValueError, match="donor's rank"):
        joint_plan(sens, depth, budgets=[0.5], cost="flops")
    with pytest.raises(ValueError, match="below the smallest reachable"):
        joint_plan(sens, depth, budgets=[0.01])
    with pytest.raises(ValueError, match="a donor is never replaced"):
        BlockSensitivity(depth.blocks, depth.cosine, depth.skip_kl, [0, 1], [1, 2],
                         depth.adapter_ranks, np.zeros((2, 2)), depth.shapes * 1)
    with pytest.raises(ValueError, match="not nested"):
        plan = joint_plan(sens, depth, budgets=[0.8, 1.0])
        data = plan.to_dict()
        data["adapter_ranks"] = [[0, 0, 0], [1, 0, 0]]  # replaced at 1.0, kept at 0.4
        JointPlan.from_dict(data)
