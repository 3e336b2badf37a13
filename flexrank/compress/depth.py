"""The depth axis (issue 18): weight-shared stand-ins for whole blocks, after FlexiGPT.

FlexiGPT (Smith et al., "Pruning and Extending Large Language Models with Low-Rank Weight
Sharing", NAACL 2025, arXiv:2501.14713) prunes the blocks that change their input least
(ShortGPT's Block Influence, 1 - cos(input, output)) and replaces each by a stand-in that
reuses the linear weights of an unpruned block plus block-specific low-rank adapters
initialised from an SVD of the weight difference, with output feature normalisation.

Here (one generic walk, any architecture whose blocks sit in an nn.ModuleList):

- `SharedLinear`: y = s ⊙ (donor(x) + U_a V_aᵀ x) + b. The donor layer (an nn.Linear,
  GPT-2 Conv1D or NestedLinear at whatever rank it runs) is held by reference and not
  registered as a submodule: its weights appear once in `state_dict`, `parameters()` and a
  safetensors file, under the donor's own name, and training updates them through both
  paths. U (m, R), V (n, R) are the adapter, ordered like DataSVD factors so that any
  prefix rank a ≤ R is the best rank-a adapter on the calibration data; `rank` sets a.
- Adapter init: DataSVD (`whitened_svd`) of D = W_pruned − W_donor with the pruned
  layer's own input covariance: the rank-a adapter minimises E‖(W_pruned − W_donor −
  U_a V_aᵀ) x‖² over the pruned block's inputs (exact at a = min(m, n)).
- Output normalisation: the per-output-channel scale s rescales each output feature of
  the stand-in to the root-mean-square the original layer gives on the calibration data,
  s_c = √(w_c Σ w_cᵀ / w̃_c Σ w̃_cᵀ) (w_c, w̃_c: row c of the original and of the
  stand-in weight at the init rank; Σ the input covariance); s = 1 at full adapter rank.
  The paper's exact normalisation formula was not available to us (only its abstract and
  summaries): this is our reading of "output feature normalisation", a learnable vector
  that starts by matching feature magnitudes and that distillation trains.
- The stand-in block is a copy of the pruned block (its own norms, attention settings and
  KV-cache slot) whose linears are SharedLinears of the donor block's.
- `probe_depth`: per block the cosine score and the KL when it is dropped; per candidate
  (the lowest cosine scores) its donor (the nearby unpruned block whose whitened weight
  difference has the least energy beyond the largest adapter rank, FlexiGPT's
  "low-rank SVD" choice read through DataSVD) and the KL with the stand-in at each adapter
  rank. Cached in a JSON file keyed by what was measured. The result, `BlockSensitivity`,
  goes to `flexrank.planning.depth.joint_plan`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flexrank.compress.calibration import as_batch, to_device
from flexrank.compress.config import EIGEN_FLOOR, DepthConfig  # noqa: F401 (re-exported)
from flexrank.compress.covariance import CovarianceStats
from flexrank.compress.decompose import (
    COMPUTE_DTYPE,
    DegenerateCovarianceError,
    Whitening,
    plain_svd,
    whitened_svd,
)
from flexrank.compress.depth_layers import (  # re-exported: the depth axis's one import
    DepthSwitch,
    SharedLinear,  # noqa: F401
    apply_depth_,  # noqa: F401
    block_linears,
    block_list,
    dense_weight,
    depth_switches_,
    relink_donors_,  # noqa: F401
    set_adapter_rank_,
    stand_in_parameters,  # noqa: F401
    stand_in_skeleton,
)
from flexrank.compress.probe import BlockCache, Damage, _run, _teacher_damage
from flexrank.io import write_json_atomic
from flexrank.planning.depth import BlockSensitivity

logger = logging.getLogger(__name__)

CACHE_FORMAT = "flexrank-depth-probe"


# ----------------------------------------------------------------------------- stand-ins


def adapter_init(pruned: torch.Tensor, donor: torch.Tensor, max_rank: int,
                 whitening: Whitening | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (m, R), V (n, R), σ) float64 with U_a V_aᵀ the best rank-a approximation of
    D = pruned − donor on the data whose whitening is given (DataSVD, DESIGN.md §4.2;
    plain SVD without one), R = min(max_rank, m, n). σ: all singular values of the
    (whitened) D, for the donor score."""
    D = pruned.to(COMPUTE_DTYPE) - donor.to(COMPUTE_DTYPE)
    factors = whitened_svd(D, whitening=whitening) if whitening is not None else plain_svd(D)
    R = min(max_rank, *D.shape)
    return factors.U[:, :R], factors.V[:, :R], factors.sigma


def output_scale(original: torch.Tensor, stand_in: torch.Tensor,
                 cov: torch.Tensor | None) -> torch.Tensor:
    """(m,) float64: √(w_c Σ w_cᵀ / w̃_c Σ w̃_cᵀ) per output row c (module docstring);
    Σ = identity without a covariance; 1 where the stand-in's row carries no energy."""
    W, S = original.to(COMPUTE_DTYPE), stand_in.to(COMPUTE_DTYPE)
    if cov is None:
        num, den = W.square().sum(1), S.square().sum(1)
    else:
        C = cov.to(COMPUTE_DTYPE)
        num, den = ((W @ C) * W).sum(1), ((S @ C) * S).sum(1)
    tiny = torch.finfo(COMPUTE_DTYPE).eps * den.abs().max().clamp_min(1e-300)
    scale = torch.ones_like(den)
    ok = (den > tiny) & (num >= 0)
    scale[ok] = (num[ok] / den[ok]).sqrt()
    return scale


class _Whitenings:
    """The whitening of each layer's input (by covariance leader: q/k/v share one)."""

    def __init__(self, stats: CovarianceStats | None, floor: float):
        self.stats, self.floor, self.cache = stats, floor, {}

    def __call__(self, name: str) -> tuple[Whitening | None, torch.Tensor | None]:
        if self.stats is None:
            return None, None
        if name not in self.stats:
            logger.warning("layer %s has no input covariance; its adapter uses plain SVD", name)
            return None, None
        leader = self.stats.leader_of[name]
        if leader not in self.cache:
            cov = self.stats.covariance(name)[0]
            try:
                self.cache[leader] = (Whitening.of(cov, self.floor), cov)
            except DegenerateCovarianceError as err:
                logger.warning("layer %s: %s; its adapter uses plain SVD", name, err)
                self.cache[leader] = (None, None)
        return self.cache[leader]


@torch.no_grad()
def build_stand_in(block: nn.Module, donor_block: nn.Module, block_name: str,
                   stats: CovarianceStats | None, max_rank: int, init_rank: int | None = None,
                   floor: float = EIGEN_FLOOR, whitenings: _Whitenings | None = None,
                   donor_name: str = "") -> nn.Module:
    """A copy of `block` whose linears are SharedLinears over `donor_block`'s (same
    relative names), adapters of rank min(max_rank, m, n), set to `init_rank` (default:
    max_rank), output scales fitted at that rank.

    `stats`: input covariances of the original model, keyed by qualified layer names
    (`block_name` + "." + relative name); without them (or for a layer they lack) the
    adapter is a plain SVD and the scale matches plain row norms, with a warning. Raises
    ValueError when the blocks' linear layers differ in names or shapes. `donor_name`: the
    donor block's qualified name, recorded for `relink_donors_`.
    """
    init_rank = max_rank if init_rank is None else init_rank
    whitenings = whitenings or _Whitenings(stats, floor)
    copy_of = stand_in_skeleton(block, donor_block, max_rank, block_name, donor_name)
    if stats is None:
        logger.warning("block %s: no covariances given; its adapters use plain SVD",
                       block_name)
    own, shared = block_linears(block), block_linears(copy_of)
    for rel, layer in own.items():
        new = shared[rel]
        W, bias = dense_weight(layer)
        Wd, donor_bias = dense_weight(new.donor)
        whitening, cov = whitenings(f"{block_name}.{rel}")
        U, V, _ = adapter_init(W, Wd, max_rank, whitening)
        new.load_factors_(U.to(new.U.dtype), V.to(new.V.dtype), new.bias)  # bias: below
        new.rank = min(init_rank, new.max_rank)
        stand_in = Wd.to(COMPUTE_DTYPE) + new.dense_weight().to(COMPUTE_DTYPE)
        scale = output_scale(W, stand_in, cov)
        new.scale.copy_(scale.to(new.scale.dtype))
        if new.bias is not None:
            zero = torch.zeros(W.shape[0], dtype=COMPUTE_DTYPE, device=W.device)
            b = bias.to(COMPUTE_DTYPE) if bias is not None else zero
            bd = donor_bias.to(COMPUTE_DTYPE) if donor_bias is not None else zero
            new.bias.copy_((b - scale * bd).to(new.bias.dtype))  # y = s(Wd x + bd + ...) + b'
    return copy_of


# ----------------------------------------------------------------------------- donors


def _donor_error(block: nn.Module, donor_block: nn.Module, block_name: str,
                 whitenings: _Whitenings, rank: int) -> float:
    """Σ over linears of the (whitened) energy of W_pruned − W_donor beyond `rank`,
    relative to the (whitened) energy of W_pruned: the output error of the stand-in at
    adapter rank `rank` on the calibration data, as a fraction of the layer's output."""
    own, donors = block_linears(block), block_linears(donor_block)
    total = 0.0
    for rel, layer in own.items():
        W, _ = dense_weight(layer)
        Wd, _ = dense_weight(donors[rel])
        whitening, _ = whitenings(f"{block_name}.{rel}")
        _, _, sigma = adapter_init(W, Wd, 1, whitening)
        Ww = W.to(COMPUTE_DTYPE)
        if whitening is not None:
            Ww = (Ww @ whitening.Q) * whitening.root
        energy = float(Ww.square().sum())
        total += float(sigma[rank:].square().sum()) / max(energy, 1e-300)
    return total


def choose_donors(blocks: Sequence[nn.Module], names: Sequence[str], candidates: Sequence[int],
                  whitenings: _Whitenings, rank: int, window: int,
                  progress: bool = False, known: Mapping[int, int] | None = None,
                  on_donor=None) -> list[int]:
    """Per candidate, the donor among the `window` nearest non-candidate blocks with the
    least `_donor_error` at `rank` (ties: the nearer, then the earlier block). One SVD per
    linear per (candidate, donor) pair: SmolLM2-135M, 15 candidates x 4 donors, minutes.

    `known`: {candidate: donor} already chosen (a resumed probe), not measured again;
    `on_donor(candidate, donor)` is called after each one measured (to save it)."""
    others = [j for j in range(len(blocks)) if j not in set(candidates)]
    if not others:
        raise ValueError("every block is a candidate: no donor is left")
    known = known or {}
    donors = []
    for c in tqdm(candidates, desc="depth probe (donors)", disable=not progress,
                  unit="block"):
        if c in known:
            donors.append(int(known[c]))
            continue
        near = sorted(others, key=lambda j: (abs(j - c), j))[:window]
        errors = {j: _donor_error(blocks[c], blocks[j], names[c], whitenings, rank)
                  for j in near}
        donors.append(min(near, key=lambda j: (errors[j], abs(j - c), j)))
        logger.info("block %s: donor %s (relative residual %s)", names[c], names[donors[-1]],
                    {names[j]: round(e, 4) for j, e in errors.items()})
        if on_donor is not None:
            on_donor(c, donors[-1])
    return donors


# ----------------------------------------------------------------------------- surgery


@torch.no_grad()
def replace_blocks_(model: nn.Module, replaced: Mapping[int, tuple[int, int]],
                    stats: CovarianceStats | None, floor: float = EIGEN_FLOOR,
                    ) -> dict[int, nn.Module]:
    """In place: block i of the model's block list becomes its stand-in over donor block d
    with adapters of rank a, for every {i: (d, a)} in `replaced`. Returns {i: stand-in}.

    Stand-ins are built from the blocks as they are before this call (all first, then
    swapped). Raises ValueError when a donor is itself replaced or an index is out of range.
    """
    _, blocks = block_list(model)
    for i, (d, _a) in replaced.items():
        if d in replaced or not (0 <= i < len(blocks) and 0 <= d < len(blocks)):
            raise ValueError(f"block {i} with donor {d}: the donor must be a block that is "
                             f"kept (replaced: {sorted(replaced)}, {len(blocks)} blocks)")
    prefix = block_list(model)[0]
    whitenings = _Whitenings(stats, floor)
    built = {i: build_stand_in(blocks[i], blocks[d], f"{prefix}.{i}", stats, a, a, floor,
                               whitenings, f"{prefix}.{d}") for i, (d, a) in replaced.items()}
    for i, stand_in in built.items():
        blocks[i] = stand_in
    return built


def _adapter_ranks_of(plan) -> list[list[int]]:
    return [list(row) for row in plan.adapter_ranks]


@torch.no_grad()
def make_depth_elastic_(model: nn.Module, plan, stats: CovarianceStats | None,
                        floor: float = EIGEN_FLOOR) -> dict[int, DepthSwitch]:
    """In place: every block that `plan` (a JointPlan) replaces at some budget becomes a
    DepthSwitch over a stand-in whose adapters have the largest rank the plan gives it
    (the smaller ones are its prefixes). Returns {block index: switch}; `apply_depth_`
    then sets a budget. Raises ValueError when the plan's blocks are not the model's."""
    _, blocks = block_list(model)
    whitenings = _Whitenings(stats, floor)

    def build(j: int, donor: int, rank: int, names: list[str]) -> nn.Module:
        return build_stand_in(blocks[j], blocks[donor], names[j], stats, rank, floor=floor,
                              whitenings=whitenings, donor_name=names[donor])

    return depth_switches_(model, plan, build)


# ----------------------------------------------------------------------------- the probe


class _Skip(nn.Module):
    """A dropped block: returns its hidden-state input, shaped like the block's output."""

    def __init__(self, tuple_output: bool):
        super().__init__()
        self.tuple_output = tuple_output

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.tuple_output else hidden_states


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def _swapped(blocks: nn.ModuleList, index: int, module: nn.Module):
    original = blocks[index]
    blocks[index] = module
    try:
        yield
    finally:
        blocks[index] = original


def _cosine_scores(model, blocks: nn.ModuleList, batches, masks, cache: BlockCache):
    """(NB,) mean over real tokens of 1 − cos(block input, block output); fills `cache`."""
    sums = np.zeros(len(blocks))
    counts = np.zeros(len(blocks))
    state = {"mask": None}

    def hook(index):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            cos = F.cosine_similarity(x.double(), _hidden(output).double(), dim=-1)  # (B, T)
            mask = state["mask"]
            weight = mask.to(cos.device).double() if mask is not None else torch.ones_like(cos)
            sums[index] += float(((1 - cos) * weight).sum())
            counts[index] += float(weight.sum())
        return record

    handles = [block.register_forward_hook(hook(i), with_kwargs=True)
               for i, block in enumerate(blocks)]
    try:
        for batch, mask in zip(batches, masks, strict=True):
            state["mask"] = mask
            cache.fill(model, [batch])
    finally:
        for handle in handles:
            handle.remove()
    return sums / np.maximum(counts, 1)


def _mean_damage(model, batches, damage: Damage, cache: BlockCache, first: int) -> float:
    total = 0.0
    for i, batch in enumerate(batches):
        with cache.skip_before(i, first):
            total += damage(i, _run(model, batch))
    return total / len(batches)


def _signature(model, blocks, names, config: DepthConfig, masks, batches, stats) -> dict:
    """What a cached depth probe must match: blocks and their layer shapes, the config,
    the probe tokens (count and a checksum of their ids), a checksum of the weights and
    of the covariances (None: plain SVD adapters)."""
    tokens = [b["input_ids"] if isinstance(b, Mapping) else b for b in batches]
    ids = sum(float(t.double().sum()) for t in tokens if torch.is_tensor(t))
    weights = sum(float(p.detach().double().abs().sum()) for p in model.parameters())
    shapes = [[list(dense_weight(m)[0].shape) for m in block_linears(b).values()]
              for b in blocks]
    covariance = None if stats is None else round(
        sum(float(t.double().abs().sum()) for t in stats.sums.values()), 3)
    return {"blocks": list(names), "shapes": shapes, "config": config.to_dict(),
            "covariance_checksum": covariance,
            "tokens": int(sum(m.sum() if m is not None else 0 for m in masks)),
            "token_checksum": ids, "weight_checksum": round(weights, 3)}


def _candidates(cosine: np.ndarray, config: DepthConfig) -> list[int]:
    """The floor(max_replaced x NB) blocks (at most NB - 1) of lowest cosine score, ascending."""
    count = min(len(cosine) - 1, math.floor(config.max_replaced * len(cosine)))
    if count < 1:
        raise ValueError(f"max_replaced = {config.max_replaced} of {len(cosine)} blocks "
                         "leaves no candidate: raise it")
    return sorted(int(i) for i in np.argsort(cosine, kind="stable")[:count])


@torch.no_grad()
def depth_candidates(model: nn.Module, batches: Sequence,
                     config: DepthConfig | None = None) -> list[int]:
    """The block indices `probe_depth(model, batches, ..., config)` will take as candidates
    (the same cosine pass, one forward of `batches`), so that a caller can collect the
    covariances of those blocks' layers only. Raises ValueError as `probe_depth`."""
    config = config or DepthConfig()
    if not batches:
        raise ValueError("the depth probe needs at least one batch")
    _, blocks = block_list(model)
    device = next(model.parameters()).device
    batches = [to_device(as_batch(b, model), device) for b in batches]
    masks = [b.get("attention_mask") if isinstance(b, Mapping) else None for b in batches]
    masks = [m.float() if m is not None else None for m in masks]
    was_training = model.training
    model.eval()
    try:
        cosine = _cosine_scores(model, blocks, batches, masks, BlockCache(list(blocks)))
    finally:
        model.train(was_training)
    return _candidates(cosine, config)


@torch.no_grad()
def probe_depth(model: nn.Module, batches: Sequence, stats: CovarianceStats | None,
                config: DepthConfig | None = None, cache_path: str | os.PathLike | None = None,
                progress: bool = True) -> BlockSensitivity:
    """The depth probe (module docstring) of `model` on `batches` (as `probe`'s: dicts with
    input_ids and attention_mask, or (B, T) id tensors); the reference is `model`'s own
    output, so nested layers should be at max rank (they are measured as they are).

    `stats`: covariances of the original model (for the adapters' whitening); None: plain
    SVD. With `cache_path`, a finished probe with the same signature is read back instead
    of measured (an interrupted one resumes after its last measured item: each dropped
    block, each candidate's donor, each candidate's stand-in), and one with another
    signature raises ValueError (delete it or choose another path). Returns a
    BlockSensitivity. Leaves `model` as it was (eval/train mode, blocks). Raises ValueError
    without batches or without a list of blocks.
    """
    config = config or DepthConfig()
    if not batches:
        raise ValueError("the depth probe needs at least one batch")
    prefix, blocks = block_list(model)
    names = [f"{prefix}.{i}" if prefix else str(i) for i in range(len(blocks))]
    device = next(model.parameters()).device
    batches = [to_device(as_batch(b, model), device) for b in batches]
    masks = [b.get("attention_mask") if isinstance(b, Mapping) else None for b in batches]
    masks = [m.float() if m is not None else None for m in masks]
    signature = _signature(model, list(blocks), names, config, masks, batches, stats)
    path = Path(cache_path) if cache_path else None
    partial: dict = {}
    if path is not None and path.is_file():
        data = json.loads(path.read_text())
        if data.get("format") != CACHE_FORMAT or data.get("signature") != signature:
            raise ValueError(f"{path} holds a depth probe of another model, data or "
                             "configuration; delete it or choose another cache path")
        if "result" in data:
            return BlockSensitivity.from_dict(data["result"])
        partial = data.get("partial", {})  # an interrupted probe: resume after its last step

    def save(part: dict) -> None:
        if path is not None:
            write_json_atomic(path, {"format": CACHE_FORMAT, "signature": signature,
                                     "partial": part})

    was_training = model.training
    model.eval()
    try:
        result = _measure(model, blocks, names, batches, masks, stats, config, progress,
                          partial, save)
    finally:
        model.train(was_training)
    if path is not None:
        write_json_atomic(path, {"format": CACHE_FORMAT, "signature": signature,
                                 "result": result.to_dict()})
    return result


def _measure(model, blocks, names, batches, masks, stats, config, progress, partial: dict,
             save) -> BlockSensitivity:
    """The probe's steps; `partial` holds finished ones and `save(partial)` is called after
    each measured item: "skip_by_block" {block (str): KL} while the drop pass runs, then
    "skip_kl" (NB,); "donor_of" {candidate (str): donor} while donors are chosen, then
    "donors" (C,); "errors" {candidate (str): (K,) KL} per stand-in."""
    damage = _teacher_damage(model, batches, masks)
    cache = BlockCache(list(blocks))
    cosine = _cosine_scores(model, blocks, batches, masks, cache)
    tuple_output = isinstance(cache.outputs[0][0], (tuple, list))
    if "skip_kl" not in partial:
        done = partial.setdefault("skip_by_block", {})
        for b in tqdm(range(len(blocks)), desc="depth probe (drop)", disable=not progress,
                      unit="block"):
            if str(b) in done:
                continue
            with _swapped(blocks, b, _Skip(tuple_output)):
                done[str(b)] = _mean_damage(model, batches, damage, cache, b)
            save(partial)
        partial["skip_kl"] = [done[str(b)] for b in range(len(blocks))]
        del partial["skip_by_block"]
        save(partial)
    skip_kl = np.array(partial["skip_kl"])
    candidates = _candidates(cosine, config)
    whitenings = _Whitenings(stats, config.eigen_floor)
    top = config.adapter_ranks[-1]
    if "donors" not in partial:
        chosen = partial.setdefault("donor_of", {})

        def record(candidate: int, donor: int) -> None:
            chosen[str(candidate)] = donor
            save(partial)

        partial["donors"] = choose_donors(list(blocks), names, candidates, whitenings, top,
                                          config.donor_window, progress,
                                          {int(c): int(d) for c, d in chosen.items()}, record)
        del partial["donor_of"]
        save(partial)
    donors = [int(d) for d in partial["donors"]]
    rows = partial.setdefault("errors", {})  # candidate block index (str) -> (K,) KL
    shapes = [[tuple(dense_weight(m)[0].shape) for m in block_linears(blocks[i]).values()]
              for i in candidates]
    for i, d in tqdm(list(zip(candidates, donors, strict=True)),
                     desc="depth probe (stand-ins)", disable=not progress, unit="block"):
        if str(i) in rows:
            continue
        stand_in = build_stand_in(blocks[i], blocks[d], names[i], stats, top,
                                  whitenings=whitenings)
        row = []
        with _swapped(blocks, i, stand_in):
            for rank in config.adapter_ranks:
                set_adapter_rank_(stand_in, rank)
                row.append(_mean_damage(model, batches, damage, cache, i))
        rows[str(i)] = row
        save(partial)
    errors = np.array([rows[str(i)] for i in candidates])
    return BlockSensitivity(names, cosine, skip_kl, candidates, donors,
                            np.array(config.adapter_ranks), errors, shapes,
                            meta={"metric": damage.metric, "config": config.to_dict(),
                                  "whitened": stats is not None})
