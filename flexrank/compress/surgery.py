"""`factorize_`: swap every target layer of a model for its nested low-rank version, in place."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from flexrank.compress.config import FactorizeConfig
from flexrank.compress.covariance import CovarianceStats
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

    def __call__(self, name: str) -> Whitening:
        leader = self.stats.leader_of[name]
        if leader != self.leader:
            self.leader, self.value = leader, None  # drop the old one before computing
            self.value = Whitening.of(self.stats.covariance(name)[0], self.floor)
        return self.value


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


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def factorize_(model: nn.Module, stats: CovarianceStats | None = None,
               config: FactorizeConfig | None = None, filter_fn: FilterFn | None = None,
               progress: bool = True) -> list[LayerReport]:
    """Replace every target layer (Linear, Conv1d/2d, GPT-2 Conv1D; not the LM head unless
    `config.include_lm_head`) by a nested layer at full rank, in place.

    With `stats` from `collect_covariances` the factors are DataSVD's; without, plain SVD.
    Returns one report per replaced layer (singular values, for tables and planning).
    """
    config = config or FactorizeConfig()
    if config.method == "data" and stats is None:
        raise ValueError("method 'data' needs covariance stats from collect_covariances(); "
                         "pass stats, or FactorizeConfig(method='plain')")
    targets = find_targets(model, filter_fn, config.include_lm_head)
    cache = WhiteningCache(stats, config.eigen_floor) if stats is not None else None
    reports = []
    for name, module in tqdm(targets.items(), desc="decompose", disable=not progress,
                             unit="layer"):
        factors = decompose_layer(name, module, stats, config, cache)
        dtype = module.weight.dtype
        new = nested_from_module(module, factors.U.to(dtype), factors.V.to(dtype))
        new.train(module.training)
        _set_submodule(model, name, new)
        shape = tuple(linear_weight(module)[0].shape)
        reports.append(LayerReport(name, type(module).__name__, shape, factors.max_rank,
                                   factors.whitened, factors.sigma))
    return reports
