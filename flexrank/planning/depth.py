"""The depth axis in the plan: which blocks are replaced by a weight-shared stand-in, at
which adapter rank, jointly with the ranks of every other layer (issue 18).

A replaced block (FlexiGPT, Smith et al., NAACL 2025, arXiv:2501.14713) reuses the
linear weights of an unpruned *donor* block, stored once, plus per-linear low-rank
adapters; it keeps its own norms. In the plan it is one more choice per block:

- kept: each of its factorised layers at one of its candidate ranks (the rank plan's
  choice, `Sensitivity`), error = the sum of the layers' errors;
- replaced at adapter level k (a candidate block only): error = the probed KL with the
  block replaced (`BlockSensitivity.errors`), cost = its stand-in's own parameters
  (`stand_in_cost`; the donor's weights are counted once, in the donor).

Assuming errors add across blocks (as the rank planner assumes across layers), the best
single plan at budget beta is a multi-choice knapsack over *blocks*: each block's options
are the Pareto frontier of its layers' rank choices, plus its replaced options. `joint_plan`
solves it exactly at every budget (the reference, `dp_error`) and builds nested plans two
ways (see `_chain`): a block replaced at beta stays replaced at every smaller beta, a kept
block's ranks and a replaced block's adapter rank are non-decreasing in beta. It keeps the
chain with the lowest error summed over the budgets.

Donors are never replaced: only `BlockSensitivity.candidates` may be, and donors are chosen
outside them (`flexrank.compress.depth`). numpy only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from flexrank.budget import match_budget
from flexrank.io import write_json_atomic
from flexrank.planning.costs import CostModel, ParamsCost, cost_matrix, gauge_fixed_params
from flexrank.planning.knapsack import (
    MAX_FRONTIER_STATES,
    InfeasibleBudgetError,
    optimal_levels,
    pareto_frontier,
)
from flexrank.planning.planner import (
    BUDGET_RTOL,
    resolve_budgets,
    resolve_cost,
    set_plan_fields_,
)
from flexrank.planning.sensitivity import Sensitivity

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KEPT = 0  # adapter rank recorded for a kept block in `JointPlan.adapter_ranks`


@dataclass
class BlockSensitivity:
    """Block importance and the damage of replacing candidate blocks (the depth probe's
    result; JSON like `Sensitivity`).

    blocks: qualified names of the repeated blocks, in order ("model.layers.3").
    cosine: (NB,) 1 - cos(block input, block output) of the hidden states, mean over real
        tokens (ShortGPT's Block Influence, the score FlexiGPT prunes by): low = the block
        barely changes its input.
    skip_kl: (NB,) KL(model || model without the block) per token (the block dropped).
    candidates: block indices that may be replaced (ascending); donors[i]: the block whose
        weights candidate i shares (never a candidate).
    adapter_ranks: (K,) candidate adapter ranks, strictly ascending (each linear of a
        stand-in uses min(rank, min(m, n))).
    errors: (C, K) KL(model || model with candidate i replaced at adapter_ranks[k]).
    shapes: per candidate, the (out m, in n) of each of its linears (for the cost).
    """

    blocks: list[str]
    cosine: np.ndarray
    skip_kl: np.ndarray
    candidates: list[int]
    donors: list[int]
    adapter_ranks: np.ndarray
    errors: np.ndarray
    shapes: list[list[tuple[int, int]]]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.cosine = np.asarray(self.cosine, dtype=np.float64)
        self.skip_kl = np.asarray(self.skip_kl, dtype=np.float64)
        self.adapter_ranks = np.asarray(self.adapter_ranks, dtype=np.int64).reshape(-1)
        self.errors = np.asarray(self.errors, dtype=np.float64).reshape(
            len(self.candidates), len(self.adapter_ranks))
        self.candidates = [int(c) for c in self.candidates]
        self.donors = [int(d) for d in self.donors]
        self.shapes = [[(int(m), int(n)) for m, n in per] for per in self.shapes]
        NB = len(self.blocks)
        if self.cosine.shape != (NB,) or self.skip_kl.shape != (NB,):
            raise ValueError(f"{NB} blocks but cosine {self.cosine.shape} and skip_kl "
                             f"{self.skip_kl.shape}: one score per block is needed")
        if len(self.donors) != len(self.candidates) or len(self.shapes) != len(self.candidates):
            raise ValueError(f"{len(self.candidates)} candidates but {len(self.donors)} donors "
                             f"and {len(self.shapes)} shape lists: one each per candidate")
        if self.candidates != sorted(set(self.candidates)) or any(
                not 0 <= c < NB for c in self.candidates):
            raise ValueError(f"candidates {self.candidates} must be distinct, ascending block "
                             f"indices in [0, {NB})")
        bad = [d for d in self.donors if d in self.candidates or not 0 <= d < NB]
        if bad:
            raise ValueError(f"donors {bad} are candidates themselves or not blocks: a donor "
                             "is never replaced")
        if len(self.adapter_ranks) and (np.any(np.diff(self.adapter_ranks) <= 0)
                                        or self.adapter_ranks[0] < 1):
            raise ValueError(f"adapter ranks {self.adapter_ranks.tolist()} must be positive "
                             "and strictly ascending")
        if not np.all(np.isfinite(self.errors)) or np.any(self.errors < 0):
            raise ValueError("replacement errors must be finite and >= 0")

    def monotone(self) -> BlockSensitivity:
        """Copy with each candidate's error non-increasing in adapter rank (running maximum
        from the right, as `Sensitivity.monotone`)."""
        errors = np.maximum.accumulate(self.errors[:, ::-1], axis=1)[:, ::-1].copy()
        return BlockSensitivity(list(self.blocks), self.cosine.copy(), self.skip_kl.copy(),
                                list(self.candidates), list(self.donors),
                                self.adapter_ranks.copy(), errors,
                                [list(s) for s in self.shapes], dict(self.meta))

    def to_dict(self) -> dict:
        return {"format": "flexrank-block-sensitivity", "format_version": FORMAT_VERSION,
                "blocks": list(self.blocks), "cosine": self.cosine.tolist(),
                "skip_kl": self.skip_kl.tolist(), "candidates": self.candidates,
                "donors": self.donors, "adapter_ranks": self.adapter_ranks.tolist(),
                "errors": self.errors.tolist(), "shapes": [[list(s) for s in per]
                                                           for per in self.shapes],
                "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict) -> BlockSensitivity:
        if data.get("format") != "flexrank-block-sensitivity":
            raise ValueError("not a FlexRank block sensitivity file (missing 'format' tag)")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"block sensitivity format version {data.get('format_version')} "
                             f"is not supported (this FlexRank reads {FORMAT_VERSION}); "
                             "re-run the depth probe")
        fields = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        return cls(**fields)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> BlockSensitivity:
        return cls.from_dict(json.loads(Path(path).read_text()))


def stand_in_cost(model: CostModel, shapes: Sequence[tuple[int, int]], rank: int) -> float:
    """Cost of one stand-in block at adapter `rank`: per linear (m x n), the adapter as a
    deployed rank-a layer, a = min(rank, min(m, n)) (model(m, n, a); a(m + n - a)
    parameters under ParamsCost), plus its m output-normalisation scales (a vector of m
    costs what a rank-1 m x 1 layer costs). The donor's weights are not counted: they are
    stored once, in the donor. Norm weights are not counted either (neither are a kept
    block's: not factorised)."""
    return float(sum(model(m, n, min(rank, m, n)) + model(m, 1, 1) for m, n in shapes))


@dataclass(frozen=True)
class JointPlan:
    """Per budget (ascending): ranks of every factorised layer, and which blocks are
    replaced at which adapter rank (`adapter_ranks[b][j]`, KEPT = 0 for a kept block).

    A replaced block's own layers are not run at that budget; their entry in `ranks` is
    their smallest candidate rank (so the table stays nested). `donors[j]` is block j's
    donor (-1: not a candidate). `cost` / `dense_cost` under `cost_model` (`kept_fraction`),
    `params`: deployed parameters r(m + n - r) of the kept layers plus the stand-ins'.
    `dp_error`: the exact per-budget optimum (not nested), the reference the nested
    plan is measured against; `method_errors`: every nested method tried.
    """

    budgets: tuple[float, ...]
    layer_names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    ranks: tuple[tuple[int, ...], ...]  # (B, L)
    blocks: tuple[str, ...]
    donors: tuple[int, ...]  # (NB,)
    adapter_ranks: tuple[tuple[int, ...], ...]  # (B, NB)
    predicted_error: tuple[float, ...]
    cost: tuple[float, ...]
    dense_cost: float
    params: tuple[int, ...]
    cost_model: str
    method: str
    dp_error: tuple[float, ...]
    method_errors: tuple[tuple[str, tuple[float, ...]], ...]
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        set_plan_fields_(
            self, blocks=tuple(map(str, self.blocks)),
            donors=tuple(int(d) for d in self.donors),
            adapter_ranks=tuple(tuple(int(a) for a in row) for row in self.adapter_ranks))
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"joint plan format version {self.format_version} is not "
                             f"supported (this FlexRank reads {FORMAT_VERSION}); re-plan")
        B, L, NB = len(self.budgets), len(self.layer_names), len(self.blocks)
        if (np.shape(self.ranks) != (B, L) or np.shape(self.adapter_ranks) != (B, NB)
                or len(self.donors) != NB or len(self.shapes) != L):
            raise ValueError(f"joint plan of {B} budgets, {L} layers, {NB} blocks has "
                             "tables of other shapes")
        if list(self.budgets) != sorted(set(self.budgets)):
            raise ValueError(f"budgets {self.budgets} must be distinct and ascending")
        problems = nesting_problems(np.array(self.ranks).reshape(B, L),
                                    np.array(self.adapter_ranks).reshape(B, NB))
        if problems:
            raise ValueError(f"joint plan is not nested: {problems[0]}")
        for j, row in enumerate(zip(*self.adapter_ranks, strict=True)):
            if any(row) and self.donors[j] < 0:
                raise ValueError(f"block {self.blocks[j]} is replaced but has no donor")

    @property
    def kept_fraction(self) -> tuple[float, ...]:
        return tuple(c / self.dense_cost for c in self.cost)

    def budget_index(self, beta: float) -> int:
        return self.budgets.index(match_budget(beta, self.budgets,
                                               "in this joint plan; its budgets are"))

    @property
    def read_params(self) -> tuple[int, ...]:
        """Per budget, the parameters one decoded token reads: `params` plus, for every
        replaced block, its donor's layers again at their planned ranks (a stand-in runs
        them; stored once, read twice). What decode time follows on a memory-bound device
        when the donor's weights are not in cache: depth saves storage, not reads."""
        out = []
        for b, row in enumerate(self.adapter_ranks):
            extra = 0
            for j, a in enumerate(row):
                if a == KEPT:
                    continue
                prefix = self.blocks[self.donors[j]] + "."
                extra += sum(gauge_fixed_params(m, n, r) for name, (m, n), r in
                             zip(self.layer_names, self.shapes, self.ranks[b], strict=True)
                             if name.startswith(prefix))
            out.append(self.params[b] + extra)
        return tuple(out)

    def ranks_for(self, beta: float) -> dict[str, int]:
        """{layer: rank} at `beta` (a replaced block's layers: see the class docstring)."""
        return dict(zip(self.layer_names, self.ranks[self.budget_index(beta)], strict=True))

    def replaced_for(self, beta: float) -> dict[str, tuple[str, int]]:
        """{replaced block: (its donor block, adapter rank)} at `beta`."""
        row = self.adapter_ranks[self.budget_index(beta)]
        return {self.blocks[j]: (self.blocks[self.donors[j]], a)
                for j, a in enumerate(row) if a != KEPT}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["method_errors"] = {name: list(errs) for name, errs in self.method_errors}
        return {"format": "flexrank-joint-plan", **data,
                "kept_fraction": list(self.kept_fraction)}

    @classmethod
    def from_dict(cls, data: dict) -> JointPlan:
        if data.get("format") != "flexrank-joint-plan":
            raise ValueError("not a FlexRank joint plan (missing 'format': "
                             "'flexrank-joint-plan')")
        fields = {k: v for k, v in data.items() if k not in ("format", "kept_fraction")}
        fields["method_errors"] = tuple(fields["method_errors"].items())
        return cls(**fields)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> JointPlan:
        return cls.from_dict(json.loads(Path(path).read_text()))


def nesting_problems(ranks: np.ndarray, adapter_ranks: np.ndarray) -> list[str]:
    """What breaks nestedness in (B, L) ranks and (B, NB) adapter ranks (budgets
    ascending): a rank that falls with the budget; a block replaced at a budget but kept
    at a smaller one; an adapter rank that falls while the block stays replaced."""
    problems = []
    for b in range(1, ranks.shape[0]):
        fell = np.flatnonzero(ranks[b] < ranks[b - 1])
        if len(fell):
            problems.append(f"layer {int(fell[0])}'s rank falls from budget {b - 1} to {b}")
        for j in range(adapter_ranks.shape[1]):
            low, high = adapter_ranks[b - 1, j], adapter_ranks[b, j]
            if high != KEPT and low == KEPT:
                problems.append(f"block {j} is replaced at budget {b} but kept at {b - 1}")
            elif high != KEPT and high < low:
                problems.append(f"block {j}'s adapter rank falls from budget {b - 1} to {b}")
    return problems


@dataclass
class _Group:
    """One block (or a layer outside every block): its layers and replaced options."""

    layers: np.ndarray  # indices into the rank sensitivity
    candidate: int  # index into BlockSensitivity.candidates, -1 when not replaceable
    replaced_costs: np.ndarray  # (K,)
    replaced_errors: np.ndarray  # (K,)


@dataclass
class _Options:
    """A group's options under some restriction: kept frontier states, then replaced."""

    costs: np.ndarray
    errors: np.ndarray
    kept_levels: list[np.ndarray]  # per kept option, (len(layers),) levels
    replaced_levels: list[int]  # per replaced option, adapter level


def _groups(sens: Sensitivity, depth: BlockSensitivity, rank_costs: np.ndarray,
            model: CostModel) -> list[_Group]:
    owner = np.full(sens.num_layers, -1)
    for j, block in enumerate(depth.blocks):
        for i, name in enumerate(sens.layer_names):
            if name.startswith(block + "."):
                owner[i] = j
    groups = []
    candidate_of = {c: i for i, c in enumerate(depth.candidates)}
    empty = np.zeros(0)
    for j in range(len(depth.blocks)):
        layers = np.flatnonzero(owner == j)
        if j in candidate_of:
            if not len(layers):
                raise ValueError(f"candidate block {depth.blocks[j]} holds no layer of the "
                                 "rank sensitivity: probe the same factorised model")
            c = candidate_of[j]
            costs = np.array([stand_in_cost(model, depth.shapes[c], int(a))
                              for a in depth.adapter_ranks])
            groups.append(_Group(layers, c, costs, depth.errors[c]))
        elif len(layers):
            groups.append(_Group(layers, -1, empty, empty))
    for i in np.flatnonzero(owner < 0):  # e.g. a factorised lm_head: a group of its own
        groups.append(_Group(np.array([i]), -1, empty, empty))
    return groups


def _options(group: _Group, rank_costs, rank_errors, kept_allowed: np.ndarray | None,
             replaced_allowed: np.ndarray, max_states) -> _Options:
    """The group's options: the Pareto frontier of its layers' allowed rank choices
    (None: kept is not allowed), then its allowed replaced levels."""
    costs, errors, kept_levels = [], [], []
    if kept_allowed is not None:
        frontier = pareto_frontier(rank_costs[group.layers], rank_errors[group.layers],
                                   kept_allowed, max_states=max_states)
        costs.extend(frontier.costs.tolist())
        errors.extend(frontier.errors.tolist())
        kept_levels = [frontier.levels(i) for i in range(len(frontier.costs))]
    replaced = [int(k) for k in np.flatnonzero(replaced_allowed)]
    costs.extend(group.replaced_costs[replaced].tolist())
    errors.extend(group.replaced_errors[replaced].tolist())
    return _Options(np.array(costs), np.array(errors), kept_levels, replaced)


def _solve(options: list[_Options], cap: float, max_states) -> list[int]:
    """Exact multi-choice knapsack over the groups' options: one option index per group."""
    width = max(len(o.costs) for o in options)
    costs = np.full((len(options), width), np.inf)
    errors = np.full((len(options), width), np.inf)
    allowed = np.zeros((len(options), width), dtype=bool)
    for g, o in enumerate(options):
        costs[g, :len(o.costs)], errors[g, :len(o.errors)] = o.costs, o.errors
        allowed[g, :len(o.costs)] = True
    levels, frontier = optimal_levels(costs, errors, cap, allowed, max_states)
    if not frontier.exact:
        log.warning("joint plan: the block frontier was merged on a cost grid (%d merges); "
                    "the optimum is within %.3g cost units", frontier.merges,
                    frontier.cost_slack())
    return [int(v) for v in levels]


@dataclass(frozen=True)
class _Choice:
    kept: np.ndarray | None  # (len(layers),) levels, or None when replaced
    adapter_level: int  # -1 when kept


def _decode(options: _Options, index: int) -> _Choice:
    if index < len(options.kept_levels):
        return _Choice(options.kept_levels[index], -1)
    return _Choice(None, options.replaced_levels[index - len(options.kept_levels)])


def _restricted(group: _Group, choice: _Choice, K: int, levels: int, direction: str):
    """(kept_allowed or None, replaced_allowed) for the next budget of a chain."""
    index = np.arange(levels)[None, :]
    adapter = np.arange(K)
    replaceable = np.full(K, group.candidate >= 0)
    if direction == "down":  # the next budget is smaller
        if choice.kept is not None:
            return index <= choice.kept[:, None], replaceable
        return None, replaceable & (adapter <= choice.adapter_level)
    if choice.kept is not None:  # the next budget is larger
        return index >= choice.kept[:, None], np.zeros(K, dtype=bool)
    return np.ones((len(group.layers), levels), dtype=bool), adapter >= choice.adapter_level


def _chain(groups, rank_costs, rank_errors, K, caps, direction, max_states) -> list[list[_Choice]]:
    """Nested choices, per budget: the exact optimum at one end budget, then at each next
    one the optimum among the choices that nest with it ('down': from the largest budget;
    'up': from the smallest). Always feasible: 'down' keeps every group's cheapest option,
    'up' keeps the previous choice, which fits a larger cap."""
    L = rank_costs.shape[1]
    full_kept = [np.ones((len(g.layers), L), dtype=bool) for g in groups]
    full_repl = [np.full(K, g.candidate >= 0) for g in groups]
    allowed = list(zip(full_kept, full_repl, strict=True))
    order = range(len(caps) - 1, -1, -1) if direction == "down" else range(len(caps))
    chosen: list[list[_Choice]] = [[] for _ in caps]
    for b in order:
        options = [_options(g, rank_costs, rank_errors, kept, repl, max_states)
                   for g, (kept, repl) in zip(groups, allowed, strict=True)]
        picks = _solve(options, caps[b], max_states)
        chosen[b] = [_decode(o, p) for o, p in zip(options, picks, strict=True)]
        allowed = [_restricted(g, c, K, L, direction)
                   for g, c in zip(groups, chosen[b], strict=True)]
    return chosen


def _tables(groups, chosen, sens: Sensitivity, depth: BlockSensitivity, rank_costs,
            rank_errors) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(B, L) ranks, (B, NB) adapter ranks, (B,) error, (B,) cost of chosen choices."""
    B = len(chosen)
    ranks = np.tile(sens.ranks[:, 0], (B, 1))
    adapters = np.zeros((B, len(depth.blocks)), dtype=np.int64)
    error, cost = np.zeros(B), np.zeros(B)
    for b in range(B):
        for g, c in zip(groups, chosen[b], strict=True):
            if c.kept is not None:
                ranks[b, g.layers] = sens.ranks[g.layers, c.kept]
                error[b] += rank_errors[g.layers, c.kept].sum()
                cost[b] += rank_costs[g.layers, c.kept].sum()
            else:
                adapters[b, depth.candidates[g.candidate]] = depth.adapter_ranks[c.adapter_level]
                error[b] += g.replaced_errors[c.adapter_level]
                cost[b] += g.replaced_costs[c.adapter_level]
    return ranks, adapters, error, cost


def joint_plan(sensitivity: Sensitivity, depth: BlockSensitivity,
               budgets: Sequence[float] | None = None, num_budgets: int | None = None,
               cost: str | CostModel = "params", monotone: bool = True,
               max_states: int | None = MAX_FRONTIER_STATES) -> JointPlan:
    """Nested joint plan (module docstring): per budget, the replaced blocks and their
    adapter ranks, and the ranks of every other layer.

    sensitivity: the rank probe of the factorised model; depth: the depth probe of the
    same model (the same probe batches, so that the two KLs compare). budgets / num_budgets
    as `flexrank.planning.planner.plan`; beta is the kept fraction of the factorised
    layers' dense cost (replaced blocks count their stand-ins). cost: "params" (default),
    "bytes" or a cost-model object; "flops" and "latency" are refused: a stand-in runs its
    donor's layers too, so its compute depends on the donor's rank (not separable).
    Raises ValueError for such a cost, budgets out of range or below the smallest
    reachable budget (every block at its cheapest option).
    """
    if isinstance(cost, str) and cost in ("flops", "latency"):
        raise ValueError(f"cost {cost!r} is not supported by the joint plan: a replaced block "
                         "runs its donor's layers as well, so its compute depends on the "
                         "donor's rank; plan with cost='params' or 'bytes'")
    sens = sensitivity.monotone() if monotone else sensitivity
    depth = depth.monotone() if monotone else depth
    model = resolve_cost(cost, sens.shapes, sens.ranks)
    rank_costs, rank_errors = cost_matrix(model, sens.shapes, sens.ranks), sens.errors
    dense = sum(model(m, n, min(m, n)) for m, n in sens.shapes)
    groups = _groups(sens, depth, rank_costs, model)
    cheapest = sum(min([rank_costs[g.layers, 0].sum(), *g.replaced_costs]) for g in groups)
    budgets = resolve_budgets(budgets, num_budgets, cheapest / dense)
    caps = [b * dense * (1 + BUDGET_RTOL) for b in budgets]
    K, L = len(depth.adapter_ranks), rank_costs.shape[1]

    full = [_options(g, rank_costs, rank_errors, np.ones((len(g.layers), L), dtype=bool),
                     np.full(K, g.candidate >= 0), max_states) for g in groups]
    optimum = [[_decode(o, p) for o, p in zip(full, _solve(full, cap, max_states),
                                              strict=True)] for cap in caps]
    dp_error = _tables(groups, optimum, sens, depth, rank_costs, rank_errors)[2]
    chains = {}
    for direction in ("down", "up"):
        try:
            chains[f"chain-{direction}"] = _chain(groups, rank_costs, rank_errors, K, caps,
                                                  direction, max_states)
        except InfeasibleBudgetError as err:  # not expected (see _chain); keep the other
            log.warning("joint plan: chain-%s found no plan (%s)", direction, err)
    tables = {name: _tables(groups, chosen, sens, depth, rank_costs, rank_errors)
              for name, chosen in chains.items()}
    method = min(tables, key=lambda name: tables[name][2].sum())
    ranks, adapters, error, total_cost = tables[method]
    donors = [-1] * len(depth.blocks)
    for c, d in zip(depth.candidates, depth.donors, strict=True):
        donors[c] = d
    params = [_deployed_params(sens, depth, groups, ranks[b], adapters[b])
              for b in range(len(budgets))]
    return JointPlan(
        budgets=tuple(budgets), layer_names=tuple(sens.layer_names), shapes=tuple(sens.shapes),
        ranks=tuple(map(tuple, ranks)), blocks=tuple(depth.blocks), donors=tuple(donors),
        adapter_ranks=tuple(map(tuple, adapters)), predicted_error=tuple(error),
        cost=tuple(total_cost), dense_cost=dense, params=tuple(params),
        cost_model=model.name, method=method, dp_error=tuple(dp_error),
        method_errors=tuple((name, tuple(t[2])) for name, t in tables.items()))


def smallest_budget(sensitivity: Sensitivity, depth: BlockSensitivity,
                    cost: str | CostModel = "params") -> float:
    """The smallest budget `joint_plan` reaches (a fraction of the factorised layers' dense
    cost): every candidate block at its cheapest option (replaced at the smallest adapter
    rank, or kept at its lowest ranks when that is cheaper), every other layer at its
    lowest candidate rank. A budget below it (beyond BUDGET_RTOL) is refused by joint_plan."""
    model = resolve_cost(cost, sensitivity.shapes, sensitivity.ranks)
    rank_costs = cost_matrix(model, sensitivity.shapes, sensitivity.ranks)
    dense = sum(model(m, n, min(m, n)) for m, n in sensitivity.shapes)
    groups = _groups(sensitivity, depth, rank_costs, model)
    return float(sum(min([rank_costs[g.layers, 0].sum(), *g.replaced_costs])
                     for g in groups) / dense)


def _deployed_params(sens, depth, groups, ranks, adapters) -> int:
    """Parameters r(m + n - r) of the kept layers plus each stand-in's (ParamsCost)."""
    total = 0
    for g in groups:
        block = depth.candidates[g.candidate] if g.candidate >= 0 else -1
        if block >= 0 and adapters[block] != KEPT:
            total += int(stand_in_cost(ParamsCost(), depth.shapes[g.candidate],
                                       int(adapters[block])))
            continue
        total += sum(gauge_fixed_params(*sens.shapes[i], int(ranks[i])) for i in g.layers)
    return total
