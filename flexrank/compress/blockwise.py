"""Block-sequential DataSVD: calibrate and factorise a model one block at a time.

The way GPTQ-style tools calibrate models that outgrow memory (GPTQ, Frantar et al., 2022,
§4 "layer-by-layer"; llm-compressor's sequential pipeline): the calibration batches run
once up to the first block, whose inputs are kept; then, block after block, the block
runs on its kept inputs with covariance hooks on its layers, its outputs become the next
block's inputs, its layers are factorised and its covariances freed. Peak memory is one
block's float64 covariances + the calibration set's hidden states + the weights, instead
of every layer's covariances at once (Llama-3-8B: ~2 GB instead of ~44 GB). The hidden
states can live on disk instead, one batch in memory at a time (`offload_dir`;
flexrank.compress.offload), which leaves one block's covariances + the weights.

The numbers are those of `collect_covariances` + `factorize_` on the whole model: every
block runs the same operations on the same inputs (the dense model's hidden states; a
block's outputs are taken before its layers are factorised), so the covariances, and the
factors, agree to float64 rounding (tests/test_blockwise.py).

Layers outside the repeated blocks (a vision model's patch embedding, an included LM
head) are calibrated in one last pass of the whole model in which every block replays the
dense outputs it produced, then factorised. A model without repeated blocks falls back to
the all-at-once path.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from flexrank.compress.calibration import as_batch, to_device
from flexrank.compress.config import FactorizeConfig
from flexrank.compress.covariance import (
    CovarianceCollector,
    collect_covariances,
    warn_few_tokens,
)
from flexrank.compress.offload import AUTO, HiddenStates, should_offload
from flexrank.compress.select import FilterFn, find_targets
from flexrank.compress.surgery import (
    LayerReport,
    WhiteningCache,
    factorize_,
    factorize_targets_,
)

logger = logging.getLogger(__name__)


def find_target_blocks(model: nn.Module, targets: Mapping[str, nn.Module],
                       ) -> tuple[str, list[nn.Module]]:
    """(qualified name of the ModuleList, its blocks): the ModuleList holding the most
    target layers, ("", []) when no ModuleList of two or more blocks holds any."""
    wanted = {id(m) for m in targets.values()}
    best_name, best, best_count = "", [], 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            count = sum(id(m) in wanted for m in module.modules())
            if count > best_count:
                best_name, best, best_count = name, list(module), count
    return best_name, best


@dataclass
class _BlockCall:
    """One batch's call of one block: hidden states and the other arguments, as captured."""

    args: tuple
    kwargs: dict

    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> _BlockCall:
        if self.args:
            return _BlockCall((hidden, *self.args[1:]), self.kwargs)
        return _BlockCall(self.args, {**self.kwargs, "hidden_states": hidden})


def _hidden_of(output) -> torch.Tensor:
    """A block's output hidden states: the output itself or its first element."""
    return output if torch.is_tensor(output) else output[0]


def _like(template, hidden: torch.Tensor):
    """`hidden` in the form of a block's output `template` (None or a tensor: `hidden`
    itself; a tuple/list: `hidden` in place of its first element)."""
    if template is None or torch.is_tensor(template):
        return hidden
    return type(template)((hidden, *template[1:]))


@contextmanager
def _replaced_forwards(blocks: Sequence[nn.Module], forward_of):
    """Each block's forward replaced by `forward_of(index)` (None: left as it is)."""
    patched = []
    try:
        for index, block in enumerate(blocks):
            forward = forward_of(index)
            if forward is not None:
                block.forward = forward
                patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward


def _run_model(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        if getattr(getattr(model, "config", None), "use_cache", False):
            batch = {**batch, "use_cache": False}  # no KV cache is needed nor kept
        model(**batch)
    else:
        model(batch)


def _token_mask(batch) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask.bool() if mask is not None else None


def _capture_block_calls(model: nn.Module, blocks: Sequence[nn.Module], batches: Sequence,
                         store: HiddenStates, offload: _Offload) -> list[list[_BlockCall]]:
    """Run every batch up to the first block (which runs once, for the form of a block's
    output); blocks after it are stood in for and only record their call. Each batch's
    input hidden states of the first block go to `store`, opened on the first batch
    (`_open_store`).

    Returns [batch][block] calls of every block without their hidden states (None in their
    place: `with_hidden` puts them back)."""
    calls_of = []
    # transformers' base model (no LM head: 128k-wide logits are not needed here) when it
    # holds the blocks; the model itself otherwise
    runner = getattr(model, "base_model", model)
    if not any(module is blocks[0] for module in runner.modules()):
        runner = model
    for b, batch in enumerate(batches):
        calls: list = [None] * len(blocks)
        output: list = [None]

        def record_first(module, args, kwargs, _calls=calls):
            _calls[0] = _BlockCall(tuple(args), dict(kwargs))

        def keep_output(module, args, output_value, _out=output):
            _out[0] = output_value

        def stand_in(index: int, _calls=calls, _out=output):
            def forward(*args, **kwargs):
                _calls[index] = _BlockCall(args, kwargs)
                return _like(_out[0], _BlockCall(args, kwargs).hidden())
            return forward

        handles = [blocks[0].register_forward_pre_hook(record_first, with_kwargs=True),
                   blocks[0].register_forward_hook(keep_output)]
        try:
            with _replaced_forwards(blocks, lambda i: stand_in(i) if i else None):
                _run_model(runner, batch if runner is model or not isinstance(batch, Mapping)
                           else {k: v for k, v in batch.items() if k != "labels"})
        finally:
            for handle in handles:
                handle.remove()
        if any(call is None for call in calls):
            missing = [i for i, call in enumerate(calls) if call is None]
            raise RuntimeError(f"blocks {missing[:3]} did not run in the model's forward: "
                               "block-sequential calibration needs every block called once "
                               "per forward; use blockwise=False")
        hidden = calls[0].hidden()
        if b == 0:
            _open_store(store, offload, hidden.numel() * hidden.element_size() * len(batches))
        store.put(b, hidden)
        # the stand-ins' hidden states (the first block's outputs) are not kept
        calls_of.append([call.with_hidden(None) for call in calls])
        del calls, output, hidden
    return calls_of


def _open_store(store: HiddenStates, offload: _Offload, estimated_bytes: int) -> None:
    """Open `store` in `offload.folder` (or in memory: None; for "auto", when the hidden
    states fit in memory) once the first batch's hidden states tell their size:
    `estimated_bytes`, that batch's bytes times the number of batches."""
    folder = offload.folder
    if offload.auto and not should_offload(estimated_bytes, store.device):
        folder = None
    store.open(folder)
    store.check_space(estimated_bytes)


@dataclass(frozen=True)
class _Offload:
    """Where the hidden states go: `folder` (None: memory); `auto`: only when they would
    not fit (offload.should_offload)."""

    folder: Path | None
    auto: bool

    @classmethod
    def of(cls, offload_dir, auto_dir) -> _Offload:
        if offload_dir is None:
            return cls(None, False)
        if isinstance(offload_dir, str) and offload_dir == AUTO:
            return cls(Path(auto_dir) if auto_dir is not None else
                       Path(tempfile.gettempdir()), True)
        if isinstance(offload_dir, str) and not offload_dir.strip():
            raise ValueError("offload_dir '' is not a folder: give a folder, 'auto' or None")
        return cls(Path(offload_dir), False)


@torch.no_grad()
def factorize_blockwise_(model: nn.Module, batches: Iterable,
                         config: FactorizeConfig | None = None,
                         filter_fn: FilterFn | None = None, precise: bool = False,
                         progress: bool = True, offload_dir: str | os.PathLike | None = None,
                         auto_dir: str | os.PathLike | None = None) -> list[LayerReport]:
    """`collect_covariances` + `factorize_` (DataSVD) one block at a time, in place.

    Same arguments and result as `factorize_(model, collect_covariances(model, batches,
    filter_fn, config.include_lm_head, precise=precise), config, filter_fn)` — the same
    factors to float64 rounding — with peak memory of one block's covariances (float64,
    (n, n) per distinct input of the block) + the calibration set's hidden states (tokens ×
    hidden size, in the model's dtype) + the weights. Batches follow
    `flexrank.compress.calibration.as_batch`. Under torch.distributed each process passes
    its shard; each block's sums are all-reduced before it is factorised. Weights keep
    their dtype (a bf16 model stays bf16; the maths per layer runs in float64, see
    decompose.COMPUTE_DTYPE).

    `offload_dir`: None keeps the hidden states in memory (on the model's device); a folder
    keeps them in files there, one batch in memory at a time (`flexrank.compress.offload`:
    the same bytes, so the same factors); "auto" does so, in `auto_dir` (default
    `tempfile.gettempdir()`; a RAM-backed /tmp saves nothing: give a folder on a disk),
    when they would take more than offload.AUTO_OFFLOAD_FRACTION of the available memory.
    The files are removed at the end, also on an error. The other arguments of each
    block's call stay in memory, held once per batch when the blocks share them (Llama in
    transformers, sdpa: position embeddings (1, T, head_dim) and no mask without padding;
    a padded batch adds a bool mask (batch, 1, T, T): 33 MB for 8 x 2048 tokens).

    Raises ValueError for a model without target layers or for config.method 'plain' (no
    calibration is needed: use factorize_), BatchError for a batch in another form,
    RuntimeError for a model whose forward does not call each block once per batch,
    flexrank.io.WriteError for an offload folder that cannot be written or has too little
    free space.
    """
    config = config or FactorizeConfig()
    if config.method != "data":
        raise ValueError(f"factorize_blockwise_ calibrates for DataSVD; method "
                         f"{config.method.value!r} needs no calibration: use factorize_")
    offload = _Offload.of(offload_dir, auto_dir)
    targets = find_targets(model, filter_fn, config.include_lm_head)
    if not targets:
        raise ValueError("the model has no layer FlexRank can factorise (Linear, Conv1d, "
                         "Conv2d, GPT-2 Conv1D)")
    order = list(targets)
    blocks_name, blocks = find_target_blocks(model, targets)
    if not blocks:
        logger.info("no repeated blocks hold the target layers: calibrating all at once")
        del targets  # factorize_ finds them again and frees each one as it is replaced
        stats = collect_covariances(model, batches, filter_fn, config.include_lm_head,
                                    precise=precise, progress=progress)
        return factorize_(model, stats, config, filter_fn, progress=progress)

    device = next(model.parameters()).device
    batches = [to_device(as_batch(b, model), device) for b in batches]
    masks = [_token_mask(b) for b in batches]
    outside = {n: targets.pop(n) for n in list(targets) if not _inside(n, blocks_name)}
    was_training = model.training
    model.eval()
    try:
        with HiddenStates(device) as store:
            calls_of = _capture_block_calls(model, blocks, batches, store, offload)
            reports, seen, templates = _factorize_blocks(
                blocks, blocks_name, targets, calls_of, store, masks, config, precise,
                progress, keep_last=bool(outside))
            if outside:  # after the blocks: their inputs need the blocks' outputs
                reports = _factorize_outside(model, blocks, outside, batches, masks, store,
                                             templates, config, precise, seen) + reports
    finally:
        model.train(was_training)
    warn_few_tokens(seen)
    return sorted(reports, key=lambda report: order.index(report.name))


def _inside(name: str, blocks_name: str) -> bool:
    return name.startswith(f"{blocks_name}.") if blocks_name else True


def _factorize_blocks(blocks, blocks_name, targets, calls_of, store: HiddenStates, masks,
                      config, precise, progress, keep_last: bool):
    """Each block in turn: covariances on its inputs (taken from `store`), its outputs put
    in `store` as the next block's inputs, its layers factorised, its covariances freed.
    One batch's hidden states are held at a time (with `store` on disk). Each block's
    layers leave `targets` as they are factorised: their dense weights are freed then.

    Returns (reports, tokens seen per leader, each batch's last-block output form for
    `_like`); the last block's outputs stay in `store` when `keep_last`."""
    reports: list[LayerReport] = []
    templates: list = [None] * len(calls_of)
    clamped = WhiteningCache(None, config.eigen_floor)  # rank-deficient inputs, for one warning
    seen: dict[str, tuple[int, int]] = {}  # leader -> (tokens, width), for the warning
    bar = tqdm(total=len(targets), desc="calibrate + decompose (by block)",
               disable=not progress, unit="layer")
    with bar:
        for index, block in enumerate(blocks):
            last = index + 1 == len(blocks)
            prefix = f"{blocks_name}.{index}" if blocks_name else str(index)
            mine = {n: targets.pop(n) for n in list(targets) if n.startswith(f"{prefix}.")}
            with CovarianceCollector(mine, precise=precise) as collector:
                for b, calls in enumerate(calls_of):
                    collector.token_mask = masks[b]
                    call = calls[index].with_hidden(store.take(b))
                    output = block(*call.args, **call.kwargs)
                    del call  # this batch's inputs: freed before the next batch is read
                    collector.end_batch()
                    if not last or keep_last:
                        store.put(b, _hidden_of(output))
                    if last and not torch.is_tensor(output):
                        templates[b] = type(output)((None, *output[1:]))
                    del output
            stats = collector.stats.all_reduce_()
            del collector  # it holds the block's layers: each is freed once replaced
            seen.update({leader: (count, stats.sums[leader].shape[0])
                         for leader, count in stats.counts.items()})
            reports += _swap(block, prefix, mine, stats, config, bar, clamped)
            del stats  # this block's covariances
    clamped.warn_rank_deficient()
    return reports, seen, templates
def _swap(root: nn.Module, prefix: str, targets, stats, config, bar,
          clamped: WhiteningCache) -> list[LayerReport]:
    """Factorise `targets` under `root`; their inputs' clamped eigenvalue counts go to
    `clamped` (one warning for the whole model, not one per block)."""
    missing = [n for n in targets if n not in stats]
    if missing:
        logger.warning("%d target layers never ran in the calibration forward passes "
                       "(e.g. %s); they will use plain SVD", len(missing), missing[:3])
    cache = WhiteningCache(stats, config.eigen_floor)
    reports = factorize_targets_(root, targets, stats, config, cache, bar, prefix)
    clamped.clamped.update(cache.clamped)
    return reports


def _factorize_outside(model, blocks, outside, batches, masks, store: HiddenStates,
                       templates, config, precise, seen) -> list[LayerReport]:
    """Layers outside the blocks: one pass of the whole model in which every block returns
    the dense output of the last block (already computed, in `store`, in the form of
    `templates`), then factorised."""
    with CovarianceCollector(outside, precise=precise) as collector:
        for b, batch in enumerate(batches):
            output = _like(templates[b], store.take(b))

            def replay(*args, _output=output, **kwargs):
                return _output
            collector.token_mask = masks[b]
            with _replaced_forwards(blocks, lambda i, _f=replay: _f):
                _run_model(model, batch)
            collector.end_batch()
            del output, replay
    stats = collector.stats.all_reduce_()
    del collector  # it holds the layers: each is freed once replaced
    seen.update({leader: (count, stats.sums[leader].shape[0])
                 for leader, count in stats.counts.items()})
    clamped = WhiteningCache(None, config.eigen_floor)
    with tqdm(total=len(outside), disable=True) as bar:
        reports = _swap(model, "", outside, stats, config, bar, clamped)
    clamped.warn_rank_deficient()
    return reports
