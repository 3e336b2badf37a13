"""Planner speed and nested-plan gaps on a synthetic SmolLM2-135M sensitivity matrix.

210 layers (30 blocks x q, k, v, o, gate, up, down with SmolLM2 shapes) x 16 candidate
ranks, error curves a_l ((d - r) / d)^g_l with log-normal scales and log-normal noise
(--noise), made non-increasing. Times the DP and each nested method (median of
--repeats) and prints each method's error gap to the exact DP optimum per budget.

    .venv/bin/python benchmarks/bench_planner.py [--repeats 5] [--budgets 0.4 0.6 ...] [--exact]

--exact also builds the exact (never merged) frontier once and checks both DPs against
it (slow: 20-40 s and a few hundred MB).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from flexrank.planning.costs import ParamsCost, cost_matrix
from flexrank.planning.knapsack import (
    MAX_FRONTIER_STATES,
    nested_dp_chain,
    nested_greedy,
    optimal_levels,
    pareto_frontier,
)
from flexrank.planning.planner import BUDGET_RTOL, plan
from flexrank.planning.sensitivity import Sensitivity

BLOCK = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
         "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
         "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536)}
BUDGETS = (0.4, 0.6, 0.8, 1.0)


def synthetic_sensitivity(num_blocks: int = 30, num_levels: int = 16, seed: int = 0,
                          noise: float = 0.05):
    rng = np.random.default_rng(seed)
    names, shapes, ranks, errors = [], [], [], []
    for block in range(num_blocks):
        for kind, (m, n) in BLOCK.items():
            full = min(m, n)
            row = np.unique(np.maximum(8, np.round(np.linspace(full / num_levels, full,
                                                                num_levels) / 8) * 8))
            row[-1] = full
            curve = rng.lognormal(0.0, 1.0) * ((full - row) / full) ** rng.uniform(1.5, 3.0)
            curve *= np.exp(noise * rng.standard_normal(len(row)))
            names.append(f"model.layers.{block}.{kind}")
            shapes.append((m, n))
            ranks.append(row.astype(np.int64))
            errors.append(np.minimum.accumulate(np.maximum(curve, 0.0)))
    return Sensitivity(names, shapes, np.array(ranks), np.array(errors))


def median_time(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--exact", action="store_true")
    parser.add_argument("--noise", type=float, default=0.05,
                        help="log-normal noise on each error value (then made monotone)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    args = parser.parse_args()
    budgets = tuple(sorted(args.budgets))

    sens = synthetic_sensitivity(noise=args.noise)
    costs = cost_matrix(ParamsCost(), sens.shapes, sens.ranks)
    errors = sens.errors
    dense = costs[:, -1].sum()
    caps = [b * dense * (1 + BUDGET_RTOL) for b in budgets]
    rows = np.arange(len(costs))
    print(f"{costs.shape[0]} layers x {costs.shape[1]} levels, dense {dense:,.0f} params, "
          f"max_states {MAX_FRONTIER_STATES}, budgets {budgets}, median of {args.repeats}")

    seconds, frontier = median_time(lambda: pareto_frontier(costs, errors), args.repeats)
    merged = [errors[rows, frontier.levels(frontier.index_at(c))].sum() for c in caps]
    print(f"\nfull DP frontier (all budgets, merged): {seconds:.2f} s, {len(frontier.costs)} "
          f"final states, {frontier.merges} merges, beta slack bound "
          f"{frontier.cost_slack() / dense:.2e}")
    seconds, optima = median_time(
        lambda: [optimal_levels(costs, errors, c) for c in caps], args.repeats)
    dp = [errors[rows, levels].sum() for levels, _ in optima]
    print(f"exact optimum per budget (branch and bound), {len(caps)} budgets: {seconds:.2f} s, "
          f"exact: {all(f.exact for _, f in optima)}, largest frontier "
          f"{max(len(p) for _, f in optima for p in f.parents)} states")
    print("merged frontier's excess error over the optimum per budget: "
          + ", ".join(f"{m - d:.2e}" for m, d in zip(merged, dp, strict=True)))

    methods = {
        "greedy": lambda: nested_greedy(costs, errors, caps, fill=False),
        "greedy-fill": lambda: nested_greedy(costs, errors, caps, fill=True),
        "dp-chain-down": lambda: nested_dp_chain(costs, errors, caps, "down"),
        "dp-chain-up": lambda: nested_dp_chain(costs, errors, caps, "up"),
    }
    header = "".join(f"{'gap @' + format(b, 'g'):>11}" for b in budgets)
    print(f"\n{'method':<14}{'time s':>8}{'total err':>11}{header}")
    print(f"{'DP (not nested)':<14}{'':>8}{sum(dp):11.4f}" + "".join(f"{d:11.4f}" for d in dp))
    for name, fn in methods.items():
        seconds, levels = median_time(fn, args.repeats)
        errs = errors[rows[None, :], levels].sum(axis=1)
        gaps = "".join(f"{e - d:11.2e}" for e, d in zip(errs, dp, strict=True))
        print(f"{name:<14}{seconds:8.2f}{errs.sum():11.4f}{gaps}")

    seconds, result = median_time(lambda: plan(sens, budgets=budgets), args.repeats)
    print(f"\nplan(sens, budgets={budgets}) end to end: {seconds:.2f} s, chose {result.method}")

    if args.exact:
        start = time.perf_counter()
        exact = pareto_frontier(costs, errors, max_states=None)
        seconds = time.perf_counter() - start
        exact_dp = [exact.errors[exact.index_at(c)] for c in caps]
        print(f"\nexact frontier: {seconds:.1f} s, {len(exact.costs)} states; error per budget "
              "minus exact, branch and bound: "
              + ", ".join(f"{d - e:.1e}" for d, e in zip(dp, exact_dp, strict=True))
              + "; merged frontier: "
              + ", ".join(f"{m - e:.1e}" for m, e in zip(merged, exact_dp, strict=True)))


if __name__ == "__main__":
    main()
