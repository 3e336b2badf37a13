"""Nested rank plans: which rank every layer keeps at every budget (DESIGN.md 4.4).

The solvers live in flexrank/knapsack.py; this module holds `plan`, `NestedPlan` and
budget handling.

`plan` solves the unconstrained optimum at every budget (branch and bound, exact) and
four nested methods (greedy, greedy-fill, dp-chain-down, dp-chain-up; see knapsack.py),
reports each one's gap to the optimum per budget and keeps the lowest total error.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flexrank.budget import match_budget, same_budget
from flexrank.io import write_json_atomic
from flexrank.planning.costs import (
    BytesCost,
    CostModel,
    FlopsCost,
    ParamsCost,
    cost_matrix,
    gauge_fixed_params,
)
from flexrank.planning.knapsack import (
    MAX_FRONTIER_STATES,
    InfeasibleBudgetError,
    nested_dp_chain,
    nested_greedy,
    optimal_levels,
)
from flexrank.planning.sensitivity import Sensitivity

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Relative float slack on a budget's cost cap beta * C_dense (whether two budgets are the same
# one is `flexrank.budget.same_budget`'s rule).
BUDGET_RTOL = 1e-9
BUDGET_GRID = 0.05  # num_budgets starts at the smallest reachable beta rounded up to this


def set_plan_fields_(plan, **more) -> None:
    """Set the fields every plan (NestedPlan, planning.depth.JointPlan) has, and `more`, on
    the frozen dataclass `plan` as plain tuples of Python numbers (JSON and numpy input
    alike), so that two equal plans compare equal whatever they were built from."""
    fields = {
        "budgets": tuple(float(b) for b in plan.budgets),
        "layer_names": tuple(str(n) for n in plan.layer_names),
        "shapes": tuple((int(m), int(n)) for m, n in plan.shapes),
        "ranks": tuple(tuple(int(r) for r in row) for row in plan.ranks),
        "predicted_error": tuple(float(e) for e in plan.predicted_error),
        "cost": tuple(float(c) for c in plan.cost),
        "params": tuple(int(p) for p in plan.params),
        "dp_error": tuple(float(e) for e in plan.dp_error),
        "method_errors": tuple((str(name), tuple(float(e) for e in errs))
                               for name, errs in plan.method_errors),
        "dense_cost": float(plan.dense_cost),
    }
    for name, value in (fields | more).items():
        object.__setattr__(plan, name, value)


@dataclass(frozen=True)
class NestedPlan:
    """Ranks per budget (nested: non-decreasing in the budget), with what they predict.

    Per budget (ascending): `ranks[b][l]`, the predicted error (sum of per-layer errors),
    the cost under `cost_model` (absolute; `kept_fraction` = cost / dense_cost) and the
    deployed parameters r(m + n - r). `dp_error` is the unconstrained DP optimum at each
    budget (non-nested; at least as good as the exact one at beta - `dp_beta_slack`);
    `method_errors` gives every nested method tried, `method` the one kept.
    """

    budgets: tuple[float, ...]
    layer_names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]  # (out m, in n) per layer
    ranks: tuple[tuple[int, ...], ...]  # (B, L)
    predicted_error: tuple[float, ...]
    cost: tuple[float, ...]
    dense_cost: float
    params: tuple[int, ...]
    cost_model: str
    method: str
    dp_error: tuple[float, ...]
    dp_beta_slack: float
    method_errors: tuple[tuple[str, tuple[float, ...]], ...]
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        set_plan_fields_(self, dp_beta_slack=float(self.dp_beta_slack))
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"plan format version {self.format_version} is not supported "
                             f"(this FlexRank reads {FORMAT_VERSION}); re-run the planner")
        B, L = len(self.budgets), len(self.layer_names)
        per_budget = ("ranks", "predicted_error", "cost", "params", "dp_error")
        if any(len(getattr(self, name)) != B for name in per_budget) or len(self.shapes) != L:
            raise ValueError(f"plan has {B} budgets and {L} layers but its per-budget fields "
                             f"or shapes have other lengths")
        if any(len(row) != L for row in self.ranks):
            raise ValueError(f"every budget's ranks must list all {L} layers")
        if not all(0 < b <= 1 for b in self.budgets) or list(self.budgets) != sorted(
                set(self.budgets)):
            raise ValueError(f"budgets {self.budgets} must be distinct, ascending, in (0, 1]")
        ranks = np.array(self.ranks, dtype=np.int64).reshape(B, L)
        if np.any(np.diff(ranks, axis=0) < 0):
            raise ValueError("ranks must be non-decreasing with the budget for every layer")
        full = np.array([min(s) for s in self.shapes])
        if np.any(ranks < 0) or np.any(ranks > full):
            raise ValueError("every rank must lie in [0, min(m, n)] of its layer")
        if self.method not in dict(self.method_errors):
            raise ValueError(f"method {self.method!r} is not among {dict(self.method_errors)}")

    @property
    def kept_fraction(self) -> tuple[float, ...]:
        return tuple(c / self.dense_cost for c in self.cost)

    @property
    def dense_params(self) -> int:
        return sum(m * n for m, n in self.shapes)

    @property
    def gap_to_dp(self) -> tuple[float, ...]:
        return tuple(e - d for e, d in zip(self.predicted_error, self.dp_error, strict=True))

    def budget_index(self, beta: float) -> int:
        """Index of `beta` in `budgets`; ValueError listing them when it is not one."""
        return self.budgets.index(match_budget(beta, self.budgets,
                                               "in this plan; its budgets are"))

    def ranks_for(self, beta: float) -> dict[str, int]:
        row = self.ranks[self.budget_index(beta)]
        return dict(zip(self.layer_names, row, strict=True))

    def whole_model_params(self, model_params: int) -> tuple[int, ...]:
        """The whole model's parameters at each budget: `model_params` (every parameter of
        the uncompressed model, a tied tensor once) with the planned layers' m·n replaced by
        their deployed r(m + n - r)."""
        if model_params < self.dense_params:
            raise ValueError(f"model_params {model_params:,} is smaller than the planned "
                             f"layers' own {self.dense_params:,}: pass the whole model's count")
        return tuple(model_params - self.dense_params + p for p in self.params)

    def summary_table(self, model_params: int | None = None,
                      bytes_per_param: float = 4.0) -> str:
        """One row per budget. β (`budget`) is the kept fraction of the factorised layers'
        deployed parameters r(m + n - r) (`params kept` is the fraction reached; `kept`, the
        same under the plan's cost model). With `model_params` (the uncompressed model's
        parameter count, a tied tensor once), `whole params` / `whole kept` / `whole MB`
        give the whole model at that budget, its fraction of `model_params` and its size at
        `bytes_per_param` (4: float32); '-' without it."""
        header = (f"{'budget':>7} {'kept':>7} {'params':>12} {'params kept':>11} "
                  f"{'whole params':>13} {'whole kept':>10} {'whole MB':>9} "
                  f"{'pred. error':>12} {'DP optimum':>12} {'gap to DP':>10}")
        whole = self.whole_model_params(model_params) if model_params else None
        lines = [f"nested plan: {len(self.layer_names)} layers, cost model {self.cost_model}, "
                 f"method {self.method}; budget = kept fraction of the factorised layers' "
                 "deployed parameters, whole = the whole model" +
                 ("" if whole else " (pass model_params for it)"), header]
        for b, budget in enumerate(self.budgets):
            cells = (f"{whole[b]:13,d} {whole[b] / model_params:10.4f} "
                     f"{whole[b] * bytes_per_param / 1e6:9.3g}" if whole
                     else f"{'-':>13} {'-':>10} {'-':>9}")
            lines.append(
                f"{budget:7.3f} {self.kept_fraction[b]:7.4f} {self.params[b]:12,d} "
                f"{self.params[b] / self.dense_params:11.4f} {cells} "
                f"{self.predicted_error[b]:12.5g} {self.dp_error[b]:12.5g} "
                f"{self.gap_to_dp[b]:10.3g}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["method_errors"] = {name: list(errs) for name, errs in self.method_errors}
        return {"format": "flexrank-plan", **data, "kept_fraction": list(self.kept_fraction)}

    @classmethod
    def from_dict(cls, data: dict) -> NestedPlan:
        if data.get("format") != "flexrank-plan":
            raise ValueError("not a FlexRank plan (missing 'format': 'flexrank-plan')")
        fields = {k: v for k, v in data.items() if k not in ("format", "kept_fraction")}
        fields["method_errors"] = tuple(fields["method_errors"].items())
        return cls(**fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> NestedPlan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> NestedPlan:
        return cls.from_json(Path(path).read_text())

    def save_heatmap(self, path: str | os.PathLike) -> None:
        from flexrank.planning.heatmap import save_heatmap

        save_heatmap(self, path)


def resolve_budgets(budgets, num_budgets, min_beta: float) -> list[float]:
    """Ascending budgets from an explicit list or a count (see `plan`); clear errors."""
    if (budgets is None) == (num_budgets is None):
        raise ValueError(f"give exactly one of budgets=[...] or num_budgets=K "
                         f"(got budgets={budgets}, num_budgets={num_budgets})")
    if num_budgets is not None:
        if isinstance(num_budgets, bool) or int(num_budgets) != num_budgets or num_budgets < 1:
            raise ValueError(f"num_budgets={num_budgets} must be a positive integer")
        low = math.ceil(min_beta / BUDGET_GRID - 1e-9) * BUDGET_GRID
        if num_budgets > 1 and low >= 1.0:
            raise ValueError(f"num_budgets={num_budgets} needs budgets below 1, but the smallest "
                             f"reachable budget is {min_beta:.4f}: probe smaller ranks")
        spaced = np.linspace(min(low, 1.0), 1.0, int(num_budgets)) if num_budgets > 1 else [1.0]
        budgets = [round(float(b), 12) for b in spaced]
    budgets = [float(b) for b in budgets]
    if not budgets:
        raise ValueError("budgets is empty: give at least one budget in (0, 1]")
    for beta in budgets:
        if not 0 < beta <= 1:
            raise ValueError(f"budget {beta} is out of range (0, 1]")
        if beta < min_beta * (1 - BUDGET_RTOL):
            raise ValueError(f"budget {beta} is below the smallest reachable budget "
                             f"{min_beta:.6f} (every layer at its lowest candidate rank): "
                             "raise it or probe smaller ranks")
    ordered = sorted(budgets)
    for a, b in zip(ordered[:-1], ordered[1:], strict=True):
        if same_budget(a, b):
            raise ValueError(f"budget {b} is given twice in {budgets}: budgets must be distinct")
    return ordered


def _nested_methods(costs, errors, caps, max_states) -> dict[str, np.ndarray]:
    methods = {
        "greedy": lambda: nested_greedy(costs, errors, caps, fill=False),
        "greedy-fill": lambda: nested_greedy(costs, errors, caps, fill=True),
        "dp-chain-down": lambda: nested_dp_chain(costs, errors, caps, "down", max_states),
        "dp-chain-up": lambda: nested_dp_chain(costs, errors, caps, "up", max_states),
    }
    results = {}
    for name, run in methods.items():
        try:
            results[name] = run()
        except InfeasibleBudgetError as err:  # dp-chain-down with costs not rising in rank
            log.warning("nested method %s found no plan (%s); skipping it", name, err)
    return results


def plan(sensitivity: Sensitivity, budgets: Sequence[float] | None = None,
         num_budgets: int | None = None, cost: str | CostModel = "params",
         monotone: bool = True, max_states: int | None = MAX_FRONTIER_STATES) -> NestedPlan:
    """Nested ranks for the budgets (fractions of the dense cost under `cost`).

    budgets: any order, each in (0, 1]; or num_budgets=K: evenly spaced from the smallest
    reachable budget (rounded up to 0.05) to 1. cost: "params" (default), "flops",
    "bytes", "latency" (measured now) or a cost-model object (flexrank.planning.costs). monotone:
    force each error curve non-increasing in rank first. max_states: see pareto_frontier.
    """
    sens = sensitivity
    if monotone and np.any(np.diff(sensitivity.errors, axis=1) > 0):
        sens = sensitivity.monotone()
    model = resolve_cost(cost, sens.shapes, sens.ranks)
    costs, errors = cost_matrix(model, sens.shapes, sens.ranks), sens.errors
    dense = sum(model(m, n, min(m, n)) for m, n in sens.shapes)
    min_beta = costs.min(axis=1).sum() / dense
    budgets = resolve_budgets(budgets, num_budgets, min_beta)
    caps = [b * dense * (1 + BUDGET_RTOL) for b in budgets]

    rows = np.arange(len(sens.layer_names))
    optima = [optimal_levels(costs, errors, cap, max_states=max_states) for cap in caps]
    dp_levels = [levels for levels, _ in optima]
    dp_error = [errors[rows, lv].sum() for lv in dp_levels]
    candidates = _nested_methods(costs, errors, caps, max_states)
    method_errors = {name: errors[rows[None, :], lv].sum(axis=1)
                     for name, lv in candidates.items()}
    method = min(method_errors, key=lambda name: method_errors[name].sum())
    levels = candidates[method]
    ranks = sens.ranks[rows[None, :], levels]
    for name, errs in method_errors.items():
        log.debug("nested method %s: total error %.6g (DP optimum %.6g)",
                 name, errs.sum(), sum(dp_error))
    return NestedPlan(
        budgets=tuple(budgets), layer_names=tuple(sens.layer_names), shapes=tuple(sens.shapes),
        ranks=tuple(map(tuple, ranks)), predicted_error=tuple(method_errors[method]),
        cost=tuple(costs[rows[None, :], levels].sum(axis=1)), dense_cost=dense,
        params=tuple(sum(gauge_fixed_params(m, n, int(r)) for (m, n), r in
                         zip(sens.shapes, row, strict=True)) for row in ranks),
        cost_model=model.name, method=method, dp_error=tuple(dp_error),
        dp_beta_slack=max(frontier.cost_slack() for _, frontier in optima) / dense,
        method_errors=tuple((name, tuple(errs)) for name, errs in method_errors.items()))


COST_MODELS = {"params": ParamsCost, "flops": FlopsCost, "bytes": BytesCost}


def resolve_cost(cost: str | CostModel, shapes, ranks) -> CostModel:
    """A cost model from a name ("params", "flops", "bytes" = fp32, "latency") or an object.

    "latency" measures a table on this host now (2 threads, batch 1); pass your own
    `measure_latency_table(...)` result to choose other settings or to reuse one.
    """
    if isinstance(cost, str):
        if cost == "latency":
            from flexrank.planning.latency_table import measure_latency_table

            log.info("measuring a latency table for %d layers", len(shapes))
            return measure_latency_table(shapes, ranks)
        if cost not in COST_MODELS:
            raise ValueError(f"unknown cost model {cost!r}; choose one of "
                             f"{[*COST_MODELS, 'latency']} or pass a cost-model object")
        return COST_MODELS[cost]()
    if not (callable(cost) and isinstance(getattr(cost, "name", None), str)):
        raise ValueError(f"cost {cost!r} is neither a cost-model name nor an object with a "
                         "`name` and __call__(m, n, r)")
    return cost
