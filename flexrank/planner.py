"""Nested rank plans: which rank every layer keeps at every budget (DESIGN.md 4.4).

Assuming errors add across layers, the best single plan at budget beta solves a
multi-choice knapsack: pick one candidate level k_l per layer minimising
sum_l errors[l, k_l] subject to sum_l cost_l(k_l) <= beta * C_dense.

- `pareto_frontier`: the DP, as a Pareto-frontier merge layer by layer (states
  (cost, error) with back-pointers, dominated states pruned); with no cap it answers
  every budget at once. Exact, but the exact frontier explodes on real models
  (SmolLM2-135M, 210 layers x 16 levels: 665k states, 20-40 s), so past `max_states`
  states it is merged on a cost grid of width g = C_max / max_states, keeping the
  lowest-error state of each cell. A merge moves a state by less than g in cost, so after
  M merges the answer at cost c is at least as good as the exact optimum at c - M g
  (`Frontier.cost_slack`).
- `optimal_levels`: the exact optimum at one budget, fast. Branch and bound on the same
  DP: a state is dropped when its error plus the LP-relaxation bound of the remaining
  layers (fractional greedy on their lower convex hulls) exceeds the error of a known
  plan (greedy-fill). On SmolLM2-sized problems at most a few thousand states survive
  and nothing is merged (0.05-0.15 s per budget, equal to the exact frontier).
- Nested plans (every layer's rank non-decreasing in the budget), four ways:
  `greedy`: global order of rank increments by error saved per unit cost along each
  layer's lower convex hull; each budget takes the longest prefix that fits (nested by
  construction, optimal at hull points). `greedy-fill`: each budget, from the previous
  one, also takes later steps that still fit. `dp-chain-down`: the exact optimum at the
  largest budget, then each smaller budget's optimum restricted to levels <= the next
  larger one's; `dp-chain-up`: from the smallest budget upwards (levels >=). `plan` runs
  all four, reports each one's gap to the exact optimum at every budget and keeps the one
  with the lowest error summed over the budgets.
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

from flexrank.costs import CostModel, cost_matrix, gauge_fixed_params, resolve_cost
from flexrank.io import write_json_atomic
from flexrank.sensitivity import Sensitivity

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Frontier states kept per layer before merging on a cost grid. 2**15 gives the full
# frontier of SmolLM2-135M (210 x 16) in ~2.5 s on 2 cores, within 0.1 % of the exact
# optimum's error (measured: benchmarks/bench_planner.py --exact).
MAX_FRONTIER_STATES = 1 << 15
BUDGET_RTOL = 1e-9  # float slack on beta * C_dense, and on matching a plan's budgets
BUDGET_GRID = 0.05  # num_budgets starts at the smallest reachable beta rounded up to this
BOUND_RTOL = 1e-9  # branch and bound keeps states within this of the known plan's error


class InfeasibleBudgetError(ValueError):
    """No choice of the allowed levels fits the budget."""


@dataclass(frozen=True)
class Frontier:
    """Pareto frontier of (total cost, total error) after all layers, with back-pointers."""

    costs: np.ndarray  # (F,) ascending
    errors: np.ndarray  # (F,) strictly descending
    parents: tuple[np.ndarray, ...]  # per layer l: state index after layer l - 1
    choices: tuple[np.ndarray, ...]  # per layer l: level chosen for layer l
    grid: float  # width of the merge grid (cost units); 0 when no merge happened
    merges: int  # number of layers after which the frontier was merged

    @property
    def exact(self) -> bool:
        return self.merges == 0

    def cost_slack(self) -> float:
        """The optimum read at cost c is at least as good as the exact one at c - slack."""
        return self.merges * self.grid

    def index_at(self, cap: float) -> int:
        """Index of the lowest-error state with cost <= cap; InfeasibleBudgetError if none."""
        index = int(np.searchsorted(self.costs, cap, side="right")) - 1
        if index < 0:
            raise InfeasibleBudgetError(f"no state fits cost {cap:g} (cheapest {self.costs[0]:g})")
        return index

    def levels(self, index: int) -> np.ndarray:
        """(L,) level per layer of frontier state `index`."""
        levels = np.empty(len(self.choices), dtype=np.int64)
        for layer in range(len(self.choices) - 1, -1, -1):
            levels[layer] = self.choices[layer][index]
            index = self.parents[layer][index]
        return levels


def _suffix_sums(values: np.ndarray) -> np.ndarray:
    """out[l] = sum of values[l + 1:]."""
    return np.concatenate([np.cumsum(values[::-1])[::-1][1:], [0.0]])


def pareto_frontier(costs: np.ndarray, errors: np.ndarray, allowed: np.ndarray | None = None,
                    cap: float = math.inf, upper_bound: float = math.inf,
                    max_states: int | None = MAX_FRONTIER_STATES) -> Frontier:
    """Multi-choice knapsack DP over layers (see the module docstring).

    costs, errors, allowed: (L, K). With a finite `cap` only costs <= cap are served:
    states that cannot fit are dropped, and of the states whose every completion fits only
    the best is kept. With a finite `upper_bound` (the error of a known plan within `cap`)
    states whose LP bound exceeds it are dropped too. `max_states=None` never merges.
    """
    L, _ = costs.shape
    allowed = np.ones(costs.shape, dtype=bool) if allowed is None else allowed
    if not allowed.any(axis=1).all():
        raise InfeasibleBudgetError("a layer has no allowed level")
    masked = np.where(allowed, costs, np.inf)
    rest_min = _suffix_sums(masked.min(axis=1))
    rest_max = _suffix_sums(np.where(allowed, costs, -np.inf).max(axis=1))
    bounds = _suffix_lp_bounds(masked, errors) if math.isfinite(upper_bound) else None
    limit = upper_bound + BOUND_RTOL * max(1.0, abs(upper_bound))
    total = rest_max[0] + costs[0][allowed[0]].max()
    grid = total / max_states if max_states else 0.0
    margin = 1e-12 * total  # suffix sums add in another order than the states do
    state_costs, state_errors = np.zeros(1), np.zeros(1)
    parents, choices, merges = [], [], 0
    for layer in range(L):
        levels = np.flatnonzero(allowed[layer])
        size = len(state_costs)
        # Level-major: each level's block is the sorted frontier shifted, so the stable
        # sort below merges len(levels) sorted runs.
        cand_costs = (costs[layer, levels][:, None] + state_costs[None, :]).ravel()
        cand_errors = (errors[layer, levels][:, None] + state_errors[None, :]).ravel()
        fits = cand_costs + rest_min[layer] <= cap + margin
        if bounds is not None:
            xp, fp = bounds[layer]
            fits &= cand_errors + np.interp(cap - cand_costs, xp, fp) <= limit
        keep = np.flatnonzero(fits)
        if len(keep) == 0:
            raise InfeasibleBudgetError(f"nothing fits cost {cap:g} after layer {layer}")
        keep = keep[np.argsort(cand_costs[keep], kind="stable")]
        c, e = cand_costs[keep], cand_errors[keep]
        best_before = np.minimum.accumulate(e)
        undominated = np.concatenate([[True], e[1:] < best_before[:-1]])
        keep, c = keep[undominated], c[undominated]
        last_of_cost = np.concatenate([c[:-1] != c[1:], [True]])  # equal cost: lowest error
        keep, c = keep[last_of_cost], c[last_of_cost]
        if math.isfinite(cap):  # every completion fits: only the best such state matters
            sure = int(np.searchsorted(c + rest_max[layer], cap - margin, side="right"))
            if sure > 1:
                keep, c = keep[sure - 1:], c[sure - 1:]
        if max_states and len(keep) > max_states:
            cell = np.floor(c / grid)
            last_in_cell = np.concatenate([cell[:-1] != cell[1:], [True]])
            last_in_cell[0] = True  # the cheapest state: the smallest budget stays reachable
            keep, c = keep[last_in_cell], c[last_in_cell]
            merges += 1
        state_costs, state_errors = c, cand_errors[keep]
        parents.append(np.tile(np.arange(size, dtype=np.int32), len(levels))[keep])
        choices.append(np.repeat(levels.astype(np.int16), size)[keep])
    return Frontier(state_costs, state_errors, tuple(parents), tuple(choices),
                    grid if merges else 0.0, merges)


def optimal_levels(costs, errors, cap: float, allowed: np.ndarray | None = None,
                   max_states: int | None = MAX_FRONTIER_STATES) -> tuple[np.ndarray, Frontier]:
    """(L,) levels of the exact optimum at cost <= cap (branch and bound; module docstring).

    Exact when the returned frontier has no merges (`Frontier.exact`).
    """
    masked = costs if allowed is None else np.where(allowed, costs, np.inf)
    if masked.min(axis=1).sum() > cap:
        raise InfeasibleBudgetError(f"the cheapest allowed plan costs {masked.min(axis=1).sum():g}"
                                    f" > {cap:g}")
    known = nested_greedy(masked, errors, [cap], fill=True)[0]
    upper = errors[np.arange(len(known)), known].sum()
    frontier = pareto_frontier(costs, errors, allowed, cap, upper, max_states)
    return frontier.levels(frontier.index_at(cap)), frontier


def nested_dp_chain(costs, errors, caps: Sequence[float], direction: str,
                    max_states: int | None = MAX_FRONTIER_STATES) -> np.ndarray:
    """(B, L) levels: the optimum at one end budget, then each next one restricted to nest."""
    if direction not in ("down", "up"):
        raise ValueError(f"direction {direction!r} must be 'down' or 'up'")
    levels = np.zeros((len(caps), costs.shape[0]), dtype=np.int64)
    allowed = np.ones(costs.shape, dtype=bool)
    level_index = np.arange(costs.shape[1])[None, :]
    order = range(len(caps) - 1, -1, -1) if direction == "down" else range(len(caps))
    for b in order:
        levels[b] = optimal_levels(costs, errors, caps[b], allowed, max_states)[0]
        if direction == "down":
            allowed = level_index <= levels[b][:, None]
        else:
            allowed = level_index >= levels[b][:, None]
    return levels


def layer_hull(costs: np.ndarray, errors: np.ndarray) -> list[int]:
    """Levels on one layer's lower convex hull, cheapest first, while error still falls.

    Levels with infinite cost (not allowed) are ignored. Slopes fall strictly along it.
    """
    finite = np.flatnonzero(np.isfinite(costs))
    hull: list[int] = []
    for k in finite[np.lexsort((errors[finite], costs[finite]))]:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = ((costs[b] - costs[a]) * (errors[k] - errors[a])
                     - (errors[b] - errors[a]) * (costs[k] - costs[a]))
            if cross > 0:
                break
            hull.pop()
        hull.append(int(k))
    falling = hull[:1]
    for k in hull[1:]:
        if errors[k] >= errors[falling[-1]]:
            break
        falling.append(k)
    return falling


def hull_steps(costs, errors, nested: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start levels (L,) and hull steps, best first: (S, 4) rows of
    (layer, from_level, to_level, d_cost) and (S,) d_error (error saved).

    Steps are sorted by error saved per unit cost. With `nested`, a layer's hull keeps
    only levels above the previous one (it already does when errors fall with rank) and
    slopes are made non-increasing along it, so each layer's steps stay in order.
    """
    starts, steps = [], []
    for layer in range(costs.shape[0]):
        hull = layer_hull(costs[layer], errors[layer])
        if nested:
            hull = [k for i, k in enumerate(hull) if all(k > j for j in hull[:i])]
        starts.append(hull[0])
        slope = math.inf
        for a, b in zip(hull[:-1], hull[1:], strict=True):
            d_cost, d_error = costs[layer, b] - costs[layer, a], errors[layer, a] - errors[layer, b]
            slope = min(slope, d_error / d_cost)
            steps.append((layer, a, b, d_cost, d_error, slope))
    table = np.array(steps, dtype=np.float64).reshape(-1, 6)
    table = table[np.lexsort((table[:, 1], table[:, 0], -table[:, 5]))]
    return np.array(starts, dtype=np.int64), table[:, :4], table[:, 4]


def _suffix_lp_bounds(costs, errors) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer l, the LP bound on the error of layers l+1.. as a function of their budget
    x (fractional greedy along their hulls): np.interp(x, xp, fp) for x >= xp[0]."""
    starts, steps, saved = hull_steps(costs, errors, nested=False)
    rows = np.arange(len(starts))
    start_costs, start_errors = costs[rows, starts], errors[rows, starts]
    bounds = []
    for layer in range(len(starts)):
        later = steps[:, 0] > layer
        xp = start_costs[layer + 1:].sum() + np.concatenate([[0.0], np.cumsum(steps[later, 3])])
        fp = start_errors[layer + 1:].sum() - np.concatenate([[0.0], np.cumsum(saved[later])])
        bounds.append((xp, fp))
    return bounds


def nested_greedy(costs, errors, caps: Sequence[float], fill: bool) -> np.ndarray:
    """(B, L) levels along the global step order, budgets ascending (nested by construction).

    Without `fill` each budget takes the longest prefix of the order that fits. With
    `fill` it then goes on through the order, taking every later step that is its layer's
    next one and still fits. Either way a budget only adds steps to the previous one.
    """
    starts, steps, _ = hull_steps(costs, errors, nested=True)
    levels = np.zeros((len(caps), costs.shape[0]), dtype=np.int64)
    current = starts.copy()
    spent = costs[np.arange(len(starts)), starts].sum()
    taken = np.zeros(len(steps), dtype=bool)
    for b, cap in enumerate(caps):
        for i, (layer, from_level, to_level, d_cost) in enumerate(steps):
            if taken[i]:
                continue
            layer = int(layer)
            if current[layer] == from_level and spent + d_cost <= cap:
                current[layer], spent, taken[i] = int(to_level), spent + d_cost, True
            elif not fill:
                break
        levels[b] = current
    return levels


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
        tuples = {
            "budgets": tuple(float(b) for b in self.budgets),
            "layer_names": tuple(str(n) for n in self.layer_names),
            "shapes": tuple((int(m), int(n)) for m, n in self.shapes),
            "ranks": tuple(tuple(int(r) for r in row) for row in self.ranks),
            "predicted_error": tuple(float(e) for e in self.predicted_error),
            "cost": tuple(float(c) for c in self.cost),
            "params": tuple(int(p) for p in self.params),
            "dp_error": tuple(float(e) for e in self.dp_error),
            "method_errors": tuple((str(name), tuple(float(e) for e in errs))
                                   for name, errs in self.method_errors),
            "dense_cost": float(self.dense_cost),
            "dp_beta_slack": float(self.dp_beta_slack),
        }
        for name, value in tuples.items():
            object.__setattr__(self, name, value)
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
        for index, budget in enumerate(self.budgets):
            if abs(budget - beta) <= BUDGET_RTOL:
                return index
        raise ValueError(f"budget {beta} is not in this plan; its budgets are "
                         f"{list(self.budgets)}: pick one of them or re-plan with this budget")

    def ranks_for(self, beta: float) -> dict[str, int]:
        row = self.ranks[self.budget_index(beta)]
        return dict(zip(self.layer_names, row, strict=True))

    def summary_table(self) -> str:
        header = (f"{'budget':>7} {'kept':>7} {'params':>12} {'params kept':>11} "
                  f"{'pred. error':>12} {'DP optimum':>12} {'gap to DP':>10}")
        lines = [f"nested plan: {len(self.layer_names)} layers, cost model {self.cost_model}, "
                 f"method {self.method}", header]
        for b, budget in enumerate(self.budgets):
            lines.append(
                f"{budget:7.3f} {self.kept_fraction[b]:7.4f} {self.params[b]:12,d} "
                f"{self.params[b] / self.dense_params:11.4f} {self.predicted_error[b]:12.5g} "
                f"{self.dp_error[b]:12.5g} {self.gap_to_dp[b]:10.3g}")
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
        from flexrank.heatmap import save_heatmap

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
        if b - a <= BUDGET_RTOL:
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
    "bytes", "latency" (measured now) or a cost-model object (flexrank.costs). monotone:
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
        log.info("nested method %s: total error %.6g (DP optimum %.6g)",
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
