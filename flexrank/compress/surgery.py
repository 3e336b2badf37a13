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

from flexrank.compress.config import FactorizeConfig
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


class WhiteningCache:
    """The last input's whitening: q/k/v (and gate/up) come one after another and share it."""

    def __init__(self, stats: CovarianceStats, floor: float):
        self.stats, self.floor = stats, floor
        self.leader: str | None = None
        self.value: Whitening | None = None
        self.clamped: dict[str, tuple[int, int]] = {}  # layer -> (clamped eigenvalues, width)

    def __call__(self, name: str) -> Whitening:
        leader = self.stats.leader_of[name]
        if leader != self.leader:
            self.leader, self.value = leader, None  # drop the old one before computing
            self.value = Whitening.of(self.stats.covariance(name)[0], self.floor)
        if self.value.clamped:
            self.clamped[name] = (self.value.clamped, self.value.root.numel())
        return self.value

    def warn_rank_deficient(self) -> None:
        """One warning for the layers whose input covariance had eigenvalues clamped."""
        if not self.clamped:
            return
        share = {name: c / width for name, (c, width) in self.clamped.items()}
        worst = sorted(share, key=share.get, reverse=True)[:3]
        logger.warning(
            "%d layers read a rank-deficient input covariance (eigenvalues below %g x the "
            "largest raised to it; worst: %s): the calibration data spans too few directions "
            "(too few tokens, one repeated token or identical sequences), so DataSVD orders "
            "the missing directions arbitrarily; calibrate on more, varied text",
            len(self.clamped), self.floor,
            ", ".join(f"{n} ({self.clamped[n][0]} of {self.clamped[n][1]})" for n in worst))


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
    for child_name, child in list(model.named_children()):
        name = f"{prefix}.{child_name}" if prefix else child_name
        new = replace(name, child)
        if new is None:
            swap_modules_(child, replace, name)
        else:
            setattr(model, child_name, new)
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
    their reports in the order of `root.named_modules()`."""
    reports = []

    def replace(name: str, module: nn.Module) -> nn.Module | None:
        if name not in targets:
            return None
        new, report = factorize_layer(name, module, stats, config, cache)
        reports.append(report)
        bar.update()
        return new

    swap_modules_(root, replace, prefix)
    return reports
