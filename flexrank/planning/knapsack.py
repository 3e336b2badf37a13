"""Multi-choice knapsack solvers behind the planner (pure numpy, no model).

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

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Frontier states kept per layer before merging on a cost grid. 2**15 gives the full
# frontier of SmolLM2-135M (210 x 16) in ~2.5 s on 2 cores, within 0.1 % of the exact
# optimum's error (measured: benchmarks/bench_planner.py --exact).
MAX_FRONTIER_STATES = 1 << 15
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
