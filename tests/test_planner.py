"""Planner: DP against brute force, nested plans, cost models, plan files, heat-map."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from flexrank.planning.costs import (
    BytesCost,
    FlopsCost,
    ParamsCost,
    cost_matrix,
    gauge_fixed_params,
)
from flexrank.planning.heatmap import block_and_type, heatmap_figure, rank_grid
from flexrank.planning.knapsack import (
    hull_steps,
    nested_dp_chain,
    nested_greedy,
    optimal_levels,
    pareto_frontier,
)
from flexrank.planning.latency_table import LatencyTable, layer_graph, measure_latency_table
from flexrank.planning.planner import BUDGET_RTOL, NestedPlan, plan
from flexrank.planning.sensitivity import Sensitivity

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
         "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]


def random_sensitivity(seed: int, num_layers: int, num_levels: int, monotone: bool = True):
    """Random shapes, increasing candidate ranks ending at full rank, random errors."""
    rng = np.random.default_rng(seed)
    shapes, ranks = [], []
    for _ in range(num_layers):
        m, n = (int(v) for v in rng.integers(num_levels, 13, size=2))
        below = rng.choice(np.arange(1, min(m, n)), size=num_levels - 1, replace=False)
        shapes.append((m, n))
        ranks.append([*sorted(int(r) for r in below), min(m, n)])
    errors = rng.exponential(1.0, size=(num_layers, num_levels))
    if monotone:
        errors = np.sort(errors, axis=1)[:, ::-1]
    errors[:, -1] = 0.0
    names = [f"model.layers.{i}.mlp.proj" for i in range(num_layers)]
    return Sensitivity(names, shapes, np.array(ranks), errors)


def brute_force_table(costs, errors):
    """Cost and error of every one-level-per-layer choice: (K**L,) arrays."""
    choices = np.array(list(itertools.product(*[range(costs.shape[1])] * costs.shape[0])))
    rows = np.arange(costs.shape[0])
    return costs[rows, choices].sum(axis=1), errors[rows, choices].sum(axis=1)


def brute_force_optimum(table, cap):
    all_costs, all_errors = table
    fits = all_costs <= cap
    return all_errors[fits].min() if fits.any() else math.inf


def chosen_error(errors, levels):
    return errors[np.arange(errors.shape[0]), levels].sum()


def chosen_cost(costs, levels):
    return costs[np.arange(costs.shape[0]), levels].sum()


# ---- exact DP -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_dp_equals_brute_force(seed):
    rng = np.random.default_rng(1000 + seed)
    num_layers, num_levels = int(rng.integers(1, 6)), int(rng.integers(2, 5))
    if seed % 2:  # params costs, errors not monotone (the DP must not rely on it)
        sens = random_sensitivity(seed, num_layers, num_levels, monotone=False)
        costs, errors = cost_matrix(ParamsCost(), sens.shapes, sens.ranks), sens.errors
    else:  # float costs that need not rise with the level, like a latency table
        costs = rng.uniform(0.1, 3.0, size=(num_layers, num_levels))
        errors = rng.exponential(1.0, size=(num_layers, num_levels))
    table = brute_force_table(costs, errors)
    frontier = pareto_frontier(costs, errors, max_states=None)
    assert frontier.exact
    total = costs.max(axis=1).sum()
    for cap in [*np.linspace(costs.min(axis=1).sum(), total, 9), *rng.uniform(0, total, 5)]:
        best = brute_force_optimum(table, cap)
        if math.isinf(best):
            with pytest.raises(ValueError):
                optimal_levels(costs, errors, cap)
            continue
        index = frontier.index_at(cap)
        levels = frontier.levels(index)
        assert frontier.errors[index] == pytest.approx(best, rel=1e-12, abs=1e-12)
        assert chosen_error(errors, levels) == pytest.approx(best, rel=1e-12, abs=1e-12)
        assert chosen_cost(costs, levels) <= cap
        levels, bnb = optimal_levels(costs, errors, cap)
        assert bnb.exact
        assert chosen_error(errors, levels) == pytest.approx(best, rel=1e-12, abs=1e-12)
        assert chosen_cost(costs, levels) <= cap


@pytest.mark.parametrize("seed", range(20))
def test_restricted_optimum_equals_brute_force(seed):
    """optimal_levels with only some levels allowed (as the nested chains call it)."""
    rng = np.random.default_rng(2000 + seed)
    num_layers, num_levels = int(rng.integers(1, 6)), int(rng.integers(2, 5))
    costs = rng.uniform(0.1, 3.0, size=(num_layers, num_levels))
    errors = rng.exponential(1.0, size=(num_layers, num_levels))
    allowed = rng.random((num_layers, num_levels)) < 0.6
    allowed[np.arange(num_layers), rng.integers(0, num_levels, num_layers)] = True
    table = brute_force_table(np.where(allowed, costs, np.inf), errors)
    for cap in np.linspace(0, costs.max(axis=1).sum(), 12):
        best = brute_force_optimum(table, cap)
        if math.isinf(best):
            with pytest.raises(ValueError):
                optimal_levels(costs, errors, cap, allowed)
            continue
        levels, _ = optimal_levels(costs, errors, cap, allowed)
        assert allowed[np.arange(num_layers), levels].all()
        assert chosen_cost(costs, levels) <= cap
        assert chosen_error(errors, levels) == pytest.approx(best, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_merged_frontier_keeps_its_stated_bound(seed):
    """With a tiny max_states the frontier is merged: its answer at cost c is feasible and
    at least as good as the exact optimum at c - cost_slack()."""
    sens = random_sensitivity(seed, 6, 4)
    costs, errors = cost_matrix(ParamsCost(), sens.shapes, sens.ranks), sens.errors
    table = brute_force_table(costs, errors)
    merged = pareto_frontier(costs, errors, max_states=6)
    assert merged.merges > 0 and merged.cost_slack() > 0
    for cap in np.linspace(costs[:, 0].sum(), costs[:, -1].sum(), 25):
        levels = merged.levels(merged.index_at(cap))
        error = chosen_error(errors, levels)
        assert chosen_cost(costs, levels) <= cap
        assert error >= brute_force_optimum(table, cap) - 1e-12
        assert error <= brute_force_optimum(table, cap - merged.cost_slack()) + 1e-12


# ---- nested plans ---------------------------------------------------------------------


def nested_methods(costs, errors, caps):
    return {"greedy": nested_greedy(costs, errors, caps, fill=False),
            "greedy-fill": nested_greedy(costs, errors, caps, fill=True),
            "dp-chain-down": nested_dp_chain(costs, errors, caps, "down"),
            "dp-chain-up": nested_dp_chain(costs, errors, caps, "up")}


@pytest.mark.parametrize("seed", range(12))
def test_nested_plans_nest_fit_and_never_beat_the_optimum(seed):
    sens = random_sensitivity(seed, 5, 4)
    costs, errors = cost_matrix(ParamsCost(), sens.shapes, sens.ranks), sens.errors
    table = brute_force_table(costs, errors)
    dense = costs[:, -1].sum()
    rng = np.random.default_rng(seed)
    lowest = costs[:, 0].sum() / dense
    budgets = sorted(rng.uniform(lowest, 1.0, size=3)) + [1.0]
    caps = [b * dense for b in budgets]
    for name, levels in nested_methods(costs, errors, caps).items():
        assert np.all(np.diff(levels, axis=0) >= 0), name
        plan_errors = [chosen_error(errors, lv) for lv in levels]
        assert np.all(np.diff(plan_errors) <= 1e-12), name
        for cap, lv, err in zip(caps, levels, plan_errors, strict=True):
            assert chosen_cost(costs, lv) <= cap, name
            assert err >= brute_force_optimum(table, cap) - 1e-12, name
    # the chain's end budget is the exact optimum itself
    down = nested_dp_chain(costs, errors, caps, "down")[-1]
    up = nested_dp_chain(costs, errors, caps, "up")[0]
    assert chosen_error(errors, down) == pytest.approx(brute_force_optimum(table, caps[-1]))
    assert chosen_error(errors, up) == pytest.approx(brute_force_optimum(table, caps[0]))


@pytest.mark.parametrize("seed", range(8))
def test_plan_reports_nested_ranks_errors_costs_and_gaps(seed):
    sens = random_sensitivity(seed, 5, 4)
    costs = cost_matrix(ParamsCost(), sens.shapes, sens.ranks)
    table = brute_force_table(costs, sens.errors)
    result = plan(sens, budgets=[1.0, 0.7, 0.85])
    assert result.budgets == (0.7, 0.85, 1.0)
    ranks = np.array(result.ranks)
    assert np.all(np.diff(ranks, axis=0) >= 0)
    dense = costs[:, -1].sum()
    assert result.dense_cost == dense
    for b, budget in enumerate(result.budgets):
        levels = np.array([list(row).index(r) for row, r in zip(sens.ranks, ranks[b],
                                                                 strict=True)])
        assert result.cost[b] == chosen_cost(costs, levels) <= budget * dense * (1 + BUDGET_RTOL)
        assert result.kept_fraction[b] == result.cost[b] / dense
        assert result.params[b] == sum(gauge_fixed_params(m, n, r) for (m, n), r in
                                       zip(sens.shapes, ranks[b], strict=True))
        assert result.predicted_error[b] == pytest.approx(chosen_error(sens.errors, levels))
        assert result.dp_error[b] == pytest.approx(brute_force_optimum(table, budget * dense))
        assert result.gap_to_dp[b] >= -1e-12
    assert np.all(np.diff(result.predicted_error) <= 1e-12)
    totals = {name: sum(errs) for name, errs in result.method_errors}
    assert set(totals) == {"greedy", "greedy-fill", "dp-chain-down", "dp-chain-up"}
    assert sum(result.predicted_error) == pytest.approx(min(totals.values()))
    assert dict(result.method_errors)[result.method] == result.predicted_error
    assert result.dp_beta_slack == 0.0


def convex_sensitivity(seed: int):
    """Error a convex function of the params cost: every level is a hull point."""
    rng = np.random.default_rng(seed)
    shapes = [(12, 8), (10, 10), (8, 16), (12, 12)]
    ranks = np.array([[2, 4, 6, 8], [2, 5, 8, 10], [2, 4, 6, 8], [3, 6, 9, 12]])
    errors = []
    for (m, n), row in zip(shapes, ranks, strict=True):
        cost = np.array([gauge_fixed_params(m, n, r) for r in row], dtype=float)
        errors.append(rng.uniform(0.5, 3.0) * (1 - cost / (m * n)) ** rng.uniform(1.5, 3.0))
    return Sensitivity([f"layers.{i}.fc" for i in range(4)], shapes, ranks, np.array(errors))


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_optimal_at_hull_points_of_convex_curves(seed):
    sens = convex_sensitivity(seed)
    costs, errors = cost_matrix(ParamsCost(), sens.shapes, sens.ranks), sens.errors
    table = brute_force_table(costs, errors)
    starts, steps, _ = hull_steps(costs, errors, nested=True)
    assert len(steps) == 4 * 3  # convex curves: every level is on its layer's hull
    hull_points = chosen_cost(costs, starts) + np.concatenate([[0.0], np.cumsum(steps[:, 3])])
    levels = nested_greedy(costs, errors, list(hull_points), fill=False)
    for cap, lv in zip(hull_points, levels, strict=True):
        assert chosen_cost(costs, lv) == pytest.approx(cap)
        assert chosen_error(errors, lv) == pytest.approx(brute_force_optimum(table, cap + 1e-9))


def test_monotone_option_plans_on_the_monotone_curves():
    sens = random_sensitivity(3, 5, 4, monotone=False)
    assert np.any(np.diff(sens.errors, axis=1) > 0)
    budgets = [0.5, 0.8, 1.0]
    assert (plan(sens, budgets=budgets).ranks
            == plan(sens.monotone(), budgets=budgets, monotone=False).ranks)


def test_other_cost_models_give_the_same_plan_as_params():
    sens = random_sensitivity(0, 5, 4)
    base = plan(sens, budgets=[0.6, 1.0])
    for cost, name in [("flops", "flops"), ("bytes", "bytes-fp32"),
                       (BytesCost("int4"), "bytes-int4")]:
        other = plan(sens, budgets=[0.6, 1.0], cost=cost)
        assert other.cost_model == name and other.ranks == base.ranks
    with pytest.raises(ValueError, match="unknown cost model 'watts'"):
        plan(sens, budgets=[0.6], cost="watts")


# ---- budgets --------------------------------------------------------------------------


def test_bad_budgets_give_clear_errors():
    sens = random_sensitivity(0, 4, 3)
    costs = cost_matrix(ParamsCost(), sens.shapes, sens.ranks)
    lowest = costs[:, 0].sum() / costs[:, -1].sum()
    with pytest.raises(ValueError, match=r"budget 1\.7 is out of range \(0, 1\]"):
        plan(sens, budgets=[0.8, 1.7])
    with pytest.raises(ValueError, match=r"budget 0\.0 is out of range \(0, 1\]"):
        plan(sens, budgets=[0.0])
    with pytest.raises(ValueError, match=f"below the smallest reachable budget {lowest:.6f}"):
        plan(sens, budgets=[lowest * 0.9, 1.0])
    with pytest.raises(ValueError, match="exactly one of budgets"):
        plan(sens, budgets=[0.8], num_budgets=3)
    with pytest.raises(ValueError, match="exactly one of budgets"):
        plan(sens)
    with pytest.raises(ValueError, match="budget 0.8 is given twice"):
        plan(sens, budgets=[0.8, 1.0, 0.8])
    with pytest.raises(ValueError, match="num_budgets=0 must be a positive integer"):
        plan(sens, num_budgets=0)


def test_num_budgets_spans_smallest_reachable_to_one():
    sens = random_sensitivity(1, 4, 3)
    costs = cost_matrix(ParamsCost(), sens.shapes, sens.ranks)
    lowest = costs[:, 0].sum() / costs[:, -1].sum()
    start = math.ceil(lowest / 0.05) * 0.05
    result = plan(sens, num_budgets=4)
    np.testing.assert_allclose(result.budgets, np.linspace(start, 1.0, 4), atol=1e-12)
    assert plan(sens, num_budgets=1).budgets == (1.0,)


# ---- plan files -----------------------------------------------------------------------


def test_plan_json_round_trips_exactly(tmp_path):
    result = plan(random_sensitivity(2, 5, 4), budgets=[0.55, 0.75, 1.0])
    assert NestedPlan.from_json(result.to_json()) == result
    path = tmp_path / "plan.json"
    result.save(path)
    assert NestedPlan.load(path) == result
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary left


def test_ranks_for_and_unknown_budgets():
    sens = random_sensitivity(4, 5, 4)
    result = plan(sens, budgets=[0.6, 1.0])
    assert result.ranks_for(1.0) == dict(zip(sens.layer_names, result.ranks[1], strict=True))
    assert result.ranks_for(0.6 + 1e-12) == result.ranks_for(0.6)
    with pytest.raises(ValueError, match=r"budget 0.7 is not in this plan; its budgets are "
                                         r"\[0.6, 1.0\]"):
        result.ranks_for(0.7)


def test_summary_table_lists_every_budget():
    result = plan(random_sensitivity(5, 5, 4), budgets=[0.6, 0.8, 1.0])
    lines = result.summary_table().splitlines()
    assert result.method in lines[0] and "gap to DP" in lines[1]
    assert [float(line.split()[0]) for line in lines[2:]] == [0.6, 0.8, 1.0]
    assert [int(line.split()[2].replace(",", "")) for line in lines[2:]] == list(result.params)


def test_plan_rejects_ranks_that_do_not_nest():
    data = plan(random_sensitivity(6, 5, 4), budgets=[0.6, 1.0]).to_dict()
    data["ranks"] = [data["ranks"][1], data["ranks"][0]]
    with pytest.raises(ValueError, match="non-decreasing with the budget"):
        NestedPlan.from_dict(data)


# ---- cost models ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 8), (16, 6), (5, 24), (576, 1536)])
def test_gauge_fixed_cost_is_dense_at_full_rank_and_rises_with_rank(shape):
    m, n = shape
    costs = [gauge_fixed_params(m, n, r) for r in range(min(m, n) + 1)]
    assert costs[-1] == m * n
    assert costs[1] == m + n - 1
    assert np.all(np.diff(costs) > 0)
    assert FlopsCost()(m, n, 3) == ParamsCost()(m, n, 3) == 3 * (m + n - 3)
    assert BytesCost("int4")(m, n, 3) == 0.5 * BytesCost("int8")(m, n, 3) == 1.5 * (m + n - 3)
    with pytest.raises(ValueError, match=r"rank .* is out of range"):
        gauge_fixed_params(m, n, min(m, n) + 1)


def test_unknown_precision():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        BytesCost("fp8")


def test_layer_graph_computes_the_gauge_fixed_layer():
    import onnxruntime as ort
    from onnx import numpy_helper

    x = np.random.default_rng(0).standard_normal((3, 12)).astype(np.float32)
    for r, dense in [(4, False), (8, True)]:
        model = layer_graph(8, 12, r, batch=3)
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {"x": x})
        if dense:
            expected = x @ weights["W"]
        else:
            z = x @ weights["V"]
            expected = np.concatenate([z, z @ weights["U"]], axis=1)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_latency_table_measures_every_shape_and_rank_and_plans():
    shapes = [(16, 8), (8, 12), (16, 8)]
    ranks = [[2, 4, 8], [2, 4, 8], [2, 4, 8]]
    table = measure_latency_table(shapes, ranks, threads=1, repeats=3)
    assert {(m, n, r) for m, n, r, _ in table.entries} == {
        (16, 8, 2), (16, 8, 4), (16, 8, 8), (8, 12, 2), (8, 12, 4), (8, 12, 8)}
    assert all(seconds > 0 for *_, seconds in table.entries)
    assert table(16, 8, 8) == dict(((m, n, r), s) for m, n, r, s in table.entries)[(16, 8, 8)]
    with pytest.raises(ValueError, match="no latency measured for a 16x8 layer at rank 3"):
        table(16, 8, 3)
    assert LatencyTable.from_dict(table.to_dict()) == table

    sens = Sensitivity(["h.0.a", "h.0.b", "h.1.a"], shapes, np.array(ranks),
                       np.array([[3.0, 1.0, 0.0], [2.0, 0.5, 0.0], [4.0, 1.0, 0.0]]))
    result = plan(sens, budgets=[1.0], cost=table)
    assert result.cost_model == "latency"
    assert result.dense_cost == pytest.approx(2 * table(16, 8, 8) + table(8, 12, 8))
    assert result.cost[0] <= result.dense_cost * (1 + BUDGET_RTOL)


def test_latency_cost_that_falls_with_rank():
    """Where a larger rank runs faster, plans skip the slow small rank and still nest."""
    table = LatencyTable(((16, 8, 2, 3.0), (16, 8, 4, 1.0), (16, 8, 8, 2.0)), 2, 1, 1)
    sens = Sensitivity(["h.0.fc", "h.1.fc"], [(16, 8), (16, 8)], np.array([[2, 4, 8]] * 2),
                       np.array([[5.0, 1.0, 0.0], [6.0, 1.5, 0.0]]))
    result = plan(sens, budgets=[0.5, 0.75, 1.0], cost=table)
    assert result.dense_cost == 4.0 and result.cost == (2.0, 3.0, 4.0)
    assert result.ranks == ((4, 4), (4, 8), (8, 8))
    assert result.predicted_error == (2.5, 1.0, 0.0) == result.dp_error
    with pytest.raises(ValueError, match="smallest reachable budget 0.500000"):
        plan(sens, budgets=[0.45], cost=table)


def dense_matmul_seconds(m: int, n: int, threads: int, repeats: int = 50) -> float:
    """Median onnxruntime seconds of y = x @ W, x: (1, n), W: (n, m), built here by hand."""
    import time

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((n, m), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"x": np.ones((1, n), np.float32)}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def test_latency_by_name_measures_a_table(monkeypatch):
    import flexrank.planning.latency_table as latency_module

    measured = []

    def recording(*args, **kwargs):
        measured.append(measure_latency_table(*args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(latency_module, "measure_latency_table", recording)
    sens = random_sensitivity(0, 2, 3)
    result = plan(sens, budgets=[1.0], cost="latency")
    assert result.cost_model == "latency" and result.dense_cost > 0
    # the table holds exactly every (m, n, r) the plan asked for, full rank included
    (table,) = measured
    wanted = {(m, n, int(r)) for (m, n), row in zip(sens.shapes, sens.ranks, strict=True)
              for r in row} | {(m, n, min(m, n)) for m, n in sens.shapes}
    assert {row[:3] for row in table.entries} == wanted
    dense = sum(table(m, n, min(m, n)) for m, n in sens.shapes)
    assert result.dense_cost == pytest.approx(dense, rel=1e-12)
    # every error is 0 at full rank only, so β = 1 keeps every layer whole, at dense cost
    assert result.ranks == (tuple(min(s) for s in sens.shapes),)
    assert result.cost[0] == pytest.approx(dense, rel=1e-12)
    # the same table passed as an object plans the same
    assert plan(sens, budgets=[1.0], cost=table) == result
    # a measured entry against this test's own onnxruntime session of the same matmul,
    # measured back to back (this shared host's speed jumps between phases; up to five
    # pairs): within 10x catches a wrong unit, not a slow host
    m, n = max(sens.shapes, key=lambda s: s[0] * s[1])
    ratios = []
    while len(ratios) < 5 and not any(0.1 <= r <= 10 for r in ratios):
        again = measure_latency_table([(m, n)], [[min(m, n)]], threads=table.threads,
                                      batch=table.batch)
        ratios.append(again(m, n, min(m, n)) / dense_matmul_seconds(m, n, table.threads))
    assert any(0.1 <= r <= 10 for r in ratios), ratios


# ---- heat-map -------------------------------------------------------------------------


def test_block_and_type_from_layer_names():
    assert block_and_type("model.layers.3.self_attn.q_proj") == (3, "q_proj")
    assert block_and_type("transformer.h.11.attn.c_attn") == (11, "c_attn")
    assert block_and_type("bert.encoder.layer.2.output.dense") == (2, "dense")
    assert block_and_type("blocks.0.mlp.fc1") == (0, "fc1")
    assert block_and_type("lm_head") == (None, "lm_head")
    assert block_and_type("model.layers_norm.4.x") == (None, "x")


def test_heatmap_grid_keeps_layers_that_share_block_and_type_apart():
    sens = random_sensitivity(8, 2, 3)
    sens = Sensitivity(["encoder.layers.0.fc", "decoder.layers.0.fc"], sens.shapes,
                       sens.ranks, sens.errors)
    rows, cols, grid = rank_grid(plan(sens, budgets=[1.0]))
    assert rows == ["0"] and cols == ["encoder.#.fc", "decoder.#.fc"]
    np.testing.assert_array_equal(grid, np.ones((1, 1, 2)))


def test_heatmap_grid_and_png(tmp_path):
    from matplotlib.image import imread

    sens = random_sensitivity(7, 5, 4)
    sens = Sensitivity(NAMES, sens.shapes, sens.ranks, sens.errors)
    result = plan(sens, budgets=[0.7, 0.85, 1.0])
    rows, cols, grid = rank_grid(result)
    assert rows == ["0", "1", "other"] and cols == ["q_proj", "down_proj", "lm_head"]
    fraction = result.ranks[0][3] / min(result.shapes[3])
    assert grid[0, 1, 1] == fraction and np.isnan(grid[0, 0, 2])
    np.testing.assert_array_equal(grid[2][~np.isnan(grid[2])], 1.0)

    figure = heatmap_figure(result)
    assert sum(1 for ax in figure.axes if ax.images) == 3
    path = tmp_path / "ranks.png"
    result.save_heatmap(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 3 * 100
