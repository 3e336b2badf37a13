"""Online input covariances Σ = Σ x xᵀ per distinct layer input, from forward hooks.

Layers that read the same tensor (q/k/v projections; gate/up of a SwiGLU MLP) share one
covariance, detected at run time by tensor identity: the first such layer accumulates
and the others point at it. Sums and token counts are unnormalised so that several
processes combine exactly with an all-reduce SUM. Activations are never stored.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flexrank.compress.calibration import as_batch, to_device
from flexrank.compress.config import RECOMMENDED_TOKENS_PER_DIM
from flexrank.compress.select import FilterFn, find_targets

logger = logging.getLogger(__name__)

# Running sums are kept in float64: Σ is ill-conditioned for real activations and its small
# eigenvalues decide the whitening (DESIGN.md §4.1). Each chunk's XᵀX is formed in
# GRAM_DTYPE over at most GRAM_CHUNK rows, then added to the float64 sum: float32 gemm is
# ~2x faster than float64 on CPU, and over 512 rows its rounding (~1e-6 relative to λ_max)
# only touches directions whose variance is too small to change the output error. Pass
# precise=True to form every product in float64.
ACCUMULATE_DTYPE = torch.float64
GRAM_DTYPE = torch.float32
GRAM_CHUNK = 512


@dataclass
class CovarianceStats:
    """Per-layer access to shared, unnormalised covariance sums."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # leader -> Σ x xᵀ (n, n)
    counts: dict[str, int] = field(default_factory=dict)  # leader -> number of tokens
    leader_of: dict[str, str] = field(default_factory=dict)  # layer -> leader layer

    def __contains__(self, layer: str) -> bool:
        return layer in self.leader_of

    def covariance(self, layer: str) -> tuple[torch.Tensor, int]:
        """(Σ x xᵀ, token count) of the input of `layer`."""
        if layer not in self.leader_of:
            raise KeyError(f"no covariance was collected for layer {layer!r}")
        leader = self.leader_of[layer]
        return self.sums[leader], self.counts[leader]

    @property
    def num_tokens(self) -> int:
        return max(self.counts.values(), default=0)

    def merge_(self, other: CovarianceStats) -> CovarianceStats:
        """Add another shard's sums (same layers) in place: Σ over all data."""
        if other.leader_of != self.leader_of:
            raise ValueError("cannot merge covariances collected over different layers")
        for key, value in other.sums.items():
            self.sums[key] = self.sums[key] + value.to(self.sums[key].device)
            self.counts[key] += other.counts[key]
        return self

    def all_reduce_(self) -> CovarianceStats:
        """Sum over all processes of an initialised torch.distributed group (no-op without)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        for key in sorted(self.sums):  # same order on every rank
            dist.all_reduce(self.sums[key], op=dist.ReduceOp.SUM)
            count = torch.tensor([self.counts[key]], dtype=torch.int64)
            dist.all_reduce(count, op=dist.ReduceOp.SUM)
            self.counts[key] = int(count.item())
        return self

    def state_dict(self) -> dict:
        return {"sums": self.sums, "counts": self.counts, "leader_of": self.leader_of}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> CovarianceStats:
        return cls(dict(state["sums"]), dict(state["counts"]), dict(state["leader_of"]))


def input_rows_kind(module: nn.Module) -> tuple:
    """What `layer_inputs` makes of a tensor for `module`: layers that read one tensor
    share a covariance only when it is the same (a ResNet block's 3×3 conv and its 1×1
    shortcut read one tensor as patches of different sizes)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return (type(module).__name__, module.kernel_size, module.dilation, module.padding,
                module.stride)
    return ("rows",)


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows (tokens or conv patches) of its flattened fan-in."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B·L, C_in·kh·kw)
    if isinstance(module, nn.Conv1d):
        x4 = x.unsqueeze(2)  # (B, C, 1, T)
        cols = F.unfold(x4, (1, module.kernel_size[0]), (1, module.dilation[0]),
                        (0, module.padding[0]), (1, module.stride[0]))
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class CovarianceCollector:
    """Owns the forward pre-hooks; use as a context manager so they are always removed."""

    def __init__(self, targets: Mapping[str, nn.Module], offload: bool = False,
                 precise: bool = False):
        self.targets = dict(targets)
        self.stats = CovarianceStats()
        self.offload = offload
        self.gram_dtype = ACCUMULATE_DTYPE if precise else GRAM_DTYPE
        self.token_mask: torch.Tensor | None = None  # (B, T) bool for the current batch
        # (id(input), input_rows_kind) -> (ref, leader)
        self._seen: dict[tuple, tuple[weakref.ref, str]] = {}
        self._handles = []

    def __enter__(self) -> CovarianceCollector:
        for name, module in self.targets.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def end_batch(self) -> None:
        self._seen.clear()

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            key = (id(x), input_rows_kind(module))
            seen = self._seen.get(key)
            if seen is not None and seen[0]() is x:  # same rows as an earlier layer's
                self._record_leader(name, seen[1])
                return
            self._seen[key] = (weakref.ref(x), name)
            self._record_leader(name, name)
            self._accumulate(name, module, x)
        return hook

    def _record_leader(self, name: str, leader: str) -> None:
        previous = self.stats.leader_of.setdefault(name, leader)
        if previous != leader:
            raise RuntimeError(
                f"layer {name} shared its input with {previous} in one batch and with "
                f"{leader} in another: the model's data flow changed between batches"
            )

    def _accumulate(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        mask = self.token_mask
        if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.to(x.device)]  # drop padding tokens: (N, n)
        rows = layer_inputs(module, x.detach()).to(self.gram_dtype)
        xtx = gram(rows, self.gram_dtype)
        if self.offload:
            xtx = xtx.cpu()
        if name in self.stats.sums:
            self.stats.sums[name] += xtx
            self.stats.counts[name] += rows.shape[0]
        else:
            self.stats.sums[name] = xtx
            self.stats.counts[name] = rows.shape[0]


def gram(rows: torch.Tensor, dtype: torch.dtype = GRAM_DTYPE,
         chunk: int = GRAM_CHUNK) -> torch.Tensor:
    """Σ rows ᵀ rows in ACCUMULATE_DTYPE, each chunk of `chunk` rows formed in `dtype`."""
    n = rows.shape[-1]
    total = torch.zeros(n, n, dtype=ACCUMULATE_DTYPE, device=rows.device)
    for part in rows.split(chunk):
        part = part.to(dtype)
        total += (part.T @ part).to(ACCUMULATE_DTYPE)
    return total


@torch.no_grad()
def collect_covariances(model: nn.Module, batches: Iterable, filter_fn: FilterFn | None = None,
                        include_lm_head: bool = False, offload: bool = False,
                        precise: bool = False, progress: bool = True,
                        reduce: bool = True) -> CovarianceStats:
    """Run `batches` through `model` and return the input covariance of every target layer.

    Batches follow `flexrank.compress.calibration.as_batch`: for a language model, dicts
    with input_ids (B, T) (their `attention_mask` excludes padding tokens) or bare (B, T)
    id tensors; for other models, the tensor their forward takes. Warns when an input saw
    fewer than RECOMMENDED_TOKENS_PER_DIM tokens per dimension (over all shards; not with
    reduce=False, whose counts are one shard's). Under torch.distributed the sums are
    all-reduced (`reduce`). `precise=True` forms every XᵀX in float64 (about 2x slower on
    CPU; see GRAM_DTYPE). Raises BatchError for a batch in another form.
    """
    targets = find_targets(model, filter_fn, include_lm_head)
    if not targets:
        raise ValueError("the model has no layer FlexRank can factorise (Linear, Conv1d, "
                         "Conv2d, GPT-2 Conv1D)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = list(batches) if not hasattr(batches, "__len__") else batches
    try:
        with CovarianceCollector(targets, offload, precise) as collector:
            for batch in tqdm(batches, desc="covariance", disable=not progress, unit="batch"):
                batch = to_device(as_batch(batch, model), device)
                if isinstance(batch, Mapping):
                    mask = batch.get("attention_mask")
                    collector.token_mask = mask.bool() if mask is not None else None
                    model(**batch)
                else:
                    collector.token_mask = None
                    model(batch)
                collector.end_batch()
    finally:
        model.train(was_training)
    stats = collector.stats
    missing = [n for n in targets if n not in stats]
    if missing:
        logger.warning("%d target layers never ran in the calibration forward passes "
                       "(e.g. %s); they will use plain SVD", len(missing), missing[:3])
    if not reduce:
        return stats  # a shard: its token counts are not the run's
    stats = stats.all_reduce_()
    _warn_few_tokens(stats)
    return stats


def _warn_few_tokens(stats: CovarianceStats) -> None:
    warn_few_tokens({leader: (count, stats.sums[leader].shape[0])
                     for leader, count in stats.counts.items()})


def warn_few_tokens(seen: Mapping[str, tuple[int, int]]) -> None:
    """Warn once when some input saw fewer than RECOMMENDED_TOKENS_PER_DIM tokens (rows)
    per dimension: its covariance is rank-poor whatever the batches' origin. `seen` maps
    each distinct input (its leader layer) to (tokens, input width)."""
    short = {leader: (count, width) for leader, (count, width) in seen.items()
             if count < RECOMMENDED_TOKENS_PER_DIM * width}
    if not short:
        return
    worst = min(short, key=lambda leader: short[leader][0] / short[leader][1])
    count, width = short[worst]
    most = max(tokens for tokens, _ in seen.values())
    # an input that reads a fraction of the tokens (a BERT pooler or a classification head
    # reads one per sequence): longer sequences do not raise its count, more sequences do
    advice = (f"it reads {count} tokens where other inputs read up to {most}, as a pooler "
              "reads one per sequence: more sequences, not longer ones") \
        if count * 2 <= most else "more or longer sequences"
    logger.warning(
        "calibration saw %d tokens for %s's %d-wide input (%.1f per dimension; %d of %d "
        "inputs below %d per dimension): the covariance is rank-poor and DataSVD's whitening "
        "unreliable; calibrate on about %d tokens or more (%s)",
        count, worst, width, count / width, len(short), len(seen),
        RECOMMENDED_TOKENS_PER_DIM, RECOMMENDED_TOKENS_PER_DIM * width, advice)
