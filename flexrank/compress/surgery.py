"""`factorize_`: swap every target layer of a model for its nested low-rank version, in place;
and `swap_modules_`, the one module-swap walk every in-place swap uses (factorising, loading
a checkpoint, building deployment forms, preparing ExecuTorch quantization)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from flexrank.compress.config import RECOMMENDED_TOKENS_PER_DIM, FactorizeConfig
from flexrank.compress.decompose import (
    DegenerateCovarianceError,
    Factors,
    Whitening,
    plain_svd,
    relative_tail_energy,
    whitened_svd,
)
from flexrank.compress.layers import linear_weight, nested_from_module
from flexrank.compress.select import FilterFn, find_targets

if TYPE_CHECKING:  # annotations only: covariance -> calibration -> models -> elastic -> here
    from flexrank.compress.covariance import CovarianceStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerReport:
    name: str
    kind: str  # module class that was replaced
    shape: tuple[int, int]  # (out, in_flat)
    max_rank: int
    whitened: bool
    sigma: torch.Tensor  # singular values, descending

    def relative_error_at(self, fraction: float) -> float:
        """Relative output error (tail energy) when keeping `fraction` of the full rank."""
        rank = round(fraction * self.max_rank)
        return float(relative_tail_energy(self.sigma)[rank])


# An input that saw enough tokens (RECOMMENDED_TOKENS_PER_DIM per dimension) and still has
# more than this share of its eigenvalues clamped spans a subspace: repeated or identical
# sequences. Below it, the clamped directions are the ill-conditioning of real activations
# (DESIGN.md §4.1): SmolLM2-135M on 32k tokens of tinyshakespeare clamps 1-3 of 576 (at
# most 0.5 %) in 12 inputs, each the direction of one feature (eigenvector ≥ 0.8 on it)
# that the RMSNorm before it all but zeroes (|weight| 1e-5 to 3e-3), the same at 8k tokens
# (benchmarks/bench_clamped_directions.py).
RANK_POOR_SHARE = 0.05


class WhiteningCache:
    """The last input's whitening: q/k/v (and gate/up) come one after another and share it.

    Also records, per layer, its input's clamped eigenvalues (`Whitening.clamped`), for one
    report over the whole model (`warn_rank_deficient`)."""

    def __init__(self, stats: CovarianceStats, floor: float):
        self.stats, self.floor = stats, floor
        self.leader: str | None = None
        self.value: Whitening | None = None
        # layer -> (clamped eigenvalues, input width, tokens its covariance summed)
        self.clamped: dict[str, tuple[int, int, int]] = {}

    def __call__(self, name: str) -> Whitening:
        leader = self.stats.leader_of[name]
        if leader != self.leader:
            self.leader, self.value = leader, None  # drop the old one before computing
            self.value = Whitening.of(self.stats.covariance(name)[0], self.floor)
        if self.value.clamped:
            self.clamped[name] = (self.value.clamped, self.value.root.numel(),
                                  self.stats.counts[leader])
        return self.value

    def warn_rank_deficient(self) -> None:
        """Report the layers whose input covariance had eigenvalues clamped, once.

        A warning when the data explains it: fewer than RECOMMENDED_TOKENS_PER_DIM tokens
        per input dimension, or more than RANK_POOR_SHARE of the eigenvalues clamped (the
        inputs span a subspace: one repeated token, identical sequences); DataSVD then
        orders the missing directions arbitrarily. Otherwise an info line: with enough
        varied tokens, a few directions of variance below floor × λ_max are the model's
        own (features a norm's weight all but zeroes, outlier features), which more
        calibration text does not change."""
        if not self.clamped:
            return
        poor = {name: v for name, v in self.clamped.items()
                if v[2] < RECOMMENDED_TOKENS_PER_DIM * v[1] or v[0] > RANK_POOR_SHARE * v[1]}
        if poor:
            logger.warning(
                "%d layers read a rank-deficient input covariance (eigenvalues below %g x the "
                "largest raised to it; worst: %s): the calibration data spans too few "
                "directions (too few tokens, one repeated token or identical sequences), so "
                "DataSVD orders the missing directions arbitrarily; calibrate on more, varied "
                "text", len(poor), self.floor, _worst(poor))
        conditioned = {name: v for name, v in self.clamped.items() if name not in poor}
        if conditioned:
            logger.info(
                "%d layers' inputs have a few directions of variance below %g x the largest "
                "(worst: %s) after %d+ tokens per dimension: the model's own (features a "
                "norm's weight all but zeroes, outlier features), not missing data; DataSVD "
                "raises those eigenvalues to the floor", len(conditioned), self.floor,
                _worst(conditioned), RECOMMENDED_TOKENS_PER_DIM)


def _worst(clamped: dict[str, tuple[int, int, int]]) -> str:
    """The three layers with the largest share of clamped eigenvalues, "name (c of n)"."""
    worst = sorted(clamped, key=lambda name: clamped[name][0] / clamped[name][1],
                   reverse=True)[:3]
    return ", ".join(f"{name} ({clamped[name][0]} of {clamped[name][1]})" for name in worst)


def decompose_layer(name: str, module: nn.Module, stats: CovarianceStats | None,
                    config: FactorizeConfig, cache: WhiteningCache | None = None) -> Factors:
    weight, _ = linear_weight(module)
    if config.method == "data" and stats is not None and name in stats:
        try:
            whitening = (cache or WhiteningCache(stats, config.eigen_floor))(name)
            return whitened_svd(weight, whitening=whitening)
        except DegenerateCovarianceError as err:
            logger.warning("layer %s: %s; falling back to plain SVD", name, err)
    elif config.method == "data":
        logger.warning("layer %s: no covariance collected; falling back to plain SVD", name)
    return plain_svd(weight)


# replace(qualified name, module) -> the module to put in its place, or None to keep it
ReplaceFn = Callable[[str, nn.Module], nn.Module | None]


def swap_modules_(model: nn.Module, replace: ReplaceFn, prefix: str = "") -> nn.Module:
    """Swap submodules of `model` in place: torchao's module-swap walk.

    `replace(name, module)` is asked once per submodule, a parent before its children, in
    the order of `model.named_modules()`; `name` is qualified from `model`
    ("model.layers.0.mlp.up_proj"). A module it returns is `setattr` on the parent in place
    of the old one, and neither is walked into (so a replacement is never replaced again);
    on None the walk goes on into the module's children. `model` itself is never offered
    (an in-place call cannot replace the caller's object). Returns `model`.
    """
    # names, not (name, module) pairs: a list of the children would keep each replaced one
    # (its dense weights) alive until its siblings are done
    for child_name in [child_name for child_name, _ in model.named_children()]:
        child = getattr(model, child_name)
        name = f"{prefix}.{child_name}" if prefix else child_name
        new = replace(name, child)
        if new is None:
            swap_modules_(child, replace, name)
        else:
            setattr(model, child_name, new)
        del child, new
    return model


def factorize_layer(name: str, module: nn.Module, stats: CovarianceStats | None,
                    config: FactorizeConfig, cache: WhiteningCache | None = None,
                    ) -> tuple[nn.Module, LayerReport]:
    """The nested version of one target layer, at full rank, and its report."""
    factors = decompose_layer(name, module, stats, config, cache)
    dtype = module.weight.dtype
    new = nested_from_module(module, factors.U.to(dtype), factors.V.to(dtype))
    new.train(module.training)
    shape = tuple(linear_weight(module)[0].shape)
    return new, LayerReport(name, type(module).__name__, shape, factors.max_rank,
                            factors.whitened, factors.sigma)


@torch.no_grad()
def factorize_(model: nn.Module, stats: CovarianceStats | None = None,
               config: FactorizeConfig | None = None, filter_fn: FilterFn | None = None,
               progress: bool = True) -> list[LayerReport]:
    """Replace every target layer (Linear, Conv1d/2d, GPT-2 Conv1D; not the LM head unless
    `config.include_lm_head`) by a nested layer at full rank, in place.

    With `stats` from `collect_covariances` the factors are DataSVD's; without, plain SVD.
    Returns one report per replaced layer (singular values, for tables and planning), in
    the order of `model.named_modules()`; logs one warning when some layers' input
    covariance is rank-deficient (`WhiteningCache.warn_rank_deficient`). Raises ValueError
    when `model` is itself a single target layer (it cannot be replaced in place).
    """
    config = config or FactorizeConfig()
    if config.method == "data" and stats is None:
        raise ValueError("method 'data' needs covariance stats from collect_covariances(); "
                         "pass stats, or FactorizeConfig(method='plain')")
    targets = find_targets(model, filter_fn, config.include_lm_head)
    if "" in targets:
        raise ValueError(f"the model is itself a {type(model).__name__}: factorize_ replaces "
                         "layers inside a model, in place; wrap it, e.g. nn.Sequential(layer)")
    cache = WhiteningCache(stats, config.eigen_floor) if stats is not None else None
    bar = tqdm(total=len(targets), desc="decompose", disable=not progress, unit="layer")

    with bar:
        reports = factorize_targets_(model, targets, stats, config, cache, bar)
    if cache is not None:
        cache.warn_rank_deficient()
    return reports


def factorize_targets_(root: nn.Module, targets, stats, config: FactorizeConfig, cache,
                       bar, prefix: str = "") -> list[LayerReport]:
    """Replace each module of `root` named in `targets` (qualified names, `prefix` before
    them) by its factorised layer (`factorize_layer`), in place, one `bar` step each;
    their reports in the order of `root.named_modules()`. Each replaced name is removed
    from `targets`, a {name: module} dict, so that nothing here keeps the dense layers
    alive beside their factors (a block's worth of weights per block of a large model:
    0.2 GB each for Llama-3.2-3B in bf16)."""
    reports = []

    def replace(name: str, module: nn.Module) -> nn.Module | None:
        if targets.pop(name, None) is None:
            return None
        new, report = factorize_layer(name, module, stats, config, cache)
        reports.append(report)
        bar.update()
        return new

    swap_modules_(root, replace, prefix)
    return reports
