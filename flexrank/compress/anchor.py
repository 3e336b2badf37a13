"""Anchoring the full budget: after distillation, β = 1 is the original model again.

Distillation trains the columns that the smaller budgets share, so at full rank the
factors no longer multiply back to W: trained like the other budgets, `flexrank compress`
left β = 1 at KL 0.075 from the original and +7 % perplexity (issue 17). The columns that
only the full budget reads (those beyond the largest rank any smaller budget keeps) are
therefore not trained but refit in closed form once training is over:

    given the trained prefix P = U_k V_kᵀ (k: the largest rank a smaller budget keeps),
    U_t V_tᵀ = the best rank-(R − k) approximation of W − P in the data's norm
               argmin E‖(W − P − U_t V_tᵀ) x‖²,  x with second moment Σ

which is DataSVD (`whitened_svd`, SVD-LLM's truncation-aware whitening; Eckart–Young in the
whitened norm) of the residual W − P. Every smaller budget reads only the prefix, so it is
unchanged. W is reproduced exactly when W − P has rank ≤ R − k (an untrained prefix: the
DataSVD initialisation); otherwise the error left is the residual's smallest k singular
values in the whitened norm, which `anchor_full_rank_` reports per layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from flexrank.compress.decompose import (
    COMPUTE_DTYPE,
    DegenerateCovarianceError,
    Whitening,
    plain_svd,
    whitened_svd,
)
from flexrank.compress.layers import linear_weight
from flexrank.compress.select import nested_layers
from flexrank.compress.surgery import WhiteningCache

if TYPE_CHECKING:
    from flexrank.compress.covariance import CovarianceStats

logger = logging.getLogger(__name__)


def refit_tail(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, keep: int,
               whitening: Whitening | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns keep…R−1 of the factors such that U Vᵀ is closest to `weight` with the first
    `keep` columns fixed: the rank-(R − keep) DataSVD of W − U_keep V_keepᵀ under
    `whitening` (plain SVD, the Frobenius norm, without one).

    weight (m, n); U (m, R), V (n, R) with R ≤ min(m, n); 0 ≤ keep ≤ R. Returns
    (U_tail (m, R − keep), V_tail (n, R − keep)) in float64. ValueError for shapes that do
    not fit or a `keep` out of range.
    """
    m, n = weight.shape
    R = U.shape[1]
    if U.shape[0] != m or V.shape != (n, R) or min(m, n) < R:
        raise ValueError(f"factors U{tuple(U.shape)} V{tuple(V.shape)} do not fit a "
                         f"({m}, {n}) weight")
    if not 0 <= keep <= R:
        raise ValueError(f"keep {keep} is out of range [0, {R}]")
    residual = weight.to(COMPUTE_DTYPE) - (U[:, :keep].to(COMPUTE_DTYPE)
                                           @ V[:, :keep].to(COMPUTE_DTYPE).T)  # (m, n)
    factors = whitened_svd(residual, whitening=whitening) if whitening is not None \
        else plain_svd(residual)
    tail = R - keep
    return factors.U[:, :tail], factors.V[:, :tail]


def solve_other_factor(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U', V') with U' V'ᵀ = W exactly, keeping the square factor of a full-rank layer:
    for R = n (V square, invertible) U' = W V⁻ᵀ, V' = V; else (R = m, U square)
    U' = U, V' = (U⁻¹ W)ᵀ. Every column of the other factor changes, so each prefix
    becomes W times an oblique projector (the form DataSVD's prefixes have).

    weight (m, n); U (m, R), V (n, R) with R = min(m, n). Float64 results. ValueError for a
    rank below min(m, n) or a singular square factor."""
    m, n = weight.shape
    R = U.shape[1]
    if min(m, n) != R or U.shape[0] != m or V.shape != (n, R):
        raise ValueError(f"factors U{tuple(U.shape)} V{tuple(V.shape)} are not the full-rank "
                         f"factors of a ({m}, {n}) weight")
    W, U, V = (t.to(COMPUTE_DTYPE) for t in (weight, U, V))
    try:
        if n == R:  # V Uᵀ = Wᵀ
            return torch.linalg.solve(V, W.T).T, V
        return U, torch.linalg.solve(U, W).T  # U Vᵀ = W
    except RuntimeError as err:  # torch.linalg's error for a singular matrix
        raise ValueError(f"the square factor of a ({m}, {n}) layer is singular: {err}") from None


@dataclass(frozen=True)
class AnchorReport:
    """Per layer, ‖(W − U Vᵀ) S‖² / ‖W S‖² at full rank (S: the whitening, or I), before
    and after the refit; the layers whose full rank no smaller budget reaches."""

    before: dict[str, float]
    after: dict[str, float]

    @property
    def worst_after(self) -> tuple[str, float]:
        name = max(self.after, key=self.after.get, default="")
        return name, self.after.get(name, 0.0)


def shared_columns(plan, layers: dict[str, nn.Module]) -> dict[str, int] | None:
    """{layer: the largest rank any budget below the plan's largest keeps} when the plan's
    largest budget holds every layer at full rank (β = 1: the original model); None when it
    does not (there is no full budget to anchor). Layers the plan does not name stay at
    full rank at every budget."""
    ranks = {b: {name: layer.max_rank for name, layer in layers.items()} | plan.ranks_for(b)
             for b in plan.budgets}
    top = max(plan.budgets)
    if any(ranks[top][name] != layer.max_rank for name, layer in layers.items()):
        return None
    smaller = [b for b in plan.budgets if b != top]
    return {name: max((ranks[b][name] for b in smaller), default=0) for name in layers}


@torch.no_grad()
def anchor_full_rank_(model: nn.Module, original: nn.Module, plan,
                      stats: CovarianceStats | None = None, eigen_floor: float = 1e-8,
                      progress: bool = True) -> AnchorReport | None:
    """Refit, in place, the factor columns of `model` that only the plan's full budget
    reads (see the module docstring), so that β = 1 reproduces `original` as closely as the
    trained shared columns allow. `original` is the model before factorisation (the
    distillation teacher): its layers have the nested layers' names. With `stats`
    (`collect_covariances` of `original`) the fit is in the data's norm (DataSVD), else in
    the Frobenius norm. Returns the per-layer relative error at full rank before and after,
    or None (nothing changed) when the plan's largest budget is not the full model.

    Raises ValueError when `original` lacks a layer of `model` or its shape differs.
    """
    layers = nested_layers(model)
    keep = shared_columns(plan, layers)
    if keep is None:
        logger.info("the plan's largest budget %g does not keep every layer at full rank: "
                    "no full budget to anchor", max(plan.budgets))
        return None
    cache = WhiteningCache(stats, eigen_floor) if stats is not None else None
    before, after = {}, {}
    for name, layer in tqdm(layers.items(), desc="anchor β=1", unit="layer",
                            disable=not progress):
        weight = _original_weight(original, name, layer)
        whitening = _whitening(cache, name)
        before[name] = _relative_error(weight, layer.U, layer.V, whitening)
        trained = layer.U.detach().clone(), layer.V.detach().clone()
        if keep[name] < layer.max_rank:  # only β = 1 reads the tail: refit it
            tail_U, tail_V = refit_tail(weight, layer.U, layer.V, keep[name], whitening)
            layer.U[:, keep[name]:] = tail_U.to(layer.U.dtype)
            layer.V[:, keep[name]:] = tail_V.to(layer.V.dtype)
        elif layer.max_rank == min(layer.U.shape[0], layer.V.shape[0]):
            # a smaller budget keeps it whole: back to W at full rank, its prefixes W·Π
            new_U, new_V = solve_other_factor(weight, layer.U, layer.V)
            layer.U.copy_(new_U)
            layer.V.copy_(new_V)
        after[name] = _relative_error(weight, layer.U, layer.V, whitening)
        if after[name] > before[name]:  # rounding to the stored dtype undid it (an
            layer.U.copy_(trained[0])  # ill-conditioned square factor): keep the trained
            layer.V.copy_(trained[1])
            after[name] = before[name]
    report = AnchorReport(before, after)
    worst, error = report.worst_after
    logger.debug("full budget anchored to the original weights: largest relative output "
                "error at full rank %.3g (%s), %.3g before the refit", error, worst,
                max(before.values(), default=0.0))
    return report


def _original_weight(original: nn.Module, name: str, layer: nn.Module) -> torch.Tensor:
    try:
        module = original.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the original model has no layer {name!r}: anchor the full budget "
                         "to the model the factors were made from") from None
    weight, _ = linear_weight(module)
    expected = (layer.U.shape[0], layer.V.shape[0])
    if tuple(weight.shape) != expected:
        raise ValueError(f"layer {name}: the original weight is {tuple(weight.shape)}, the "
                         f"factors make {expected}; anchor to the model they were made from")
    return weight.to(layer.U.device)


def _whitening(cache: WhiteningCache | None, name: str) -> Whitening | None:
    if cache is None or name not in cache.stats:
        return None
    try:
        return cache(name)
    except DegenerateCovarianceError as err:
        logger.warning("layer %s: %s; its full rank is refit in the Frobenius norm", name, err)
        return None


def _relative_error(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                    whitening: Whitening | None) -> float:
    """‖(W − U Vᵀ) S‖²_F / ‖W S‖²_F (S = Q diag(root) Qᵀ, or I)."""
    W = weight.to(COMPUTE_DTYPE)
    D = W - U.to(COMPUTE_DTYPE) @ V.to(COMPUTE_DTYPE).T
    if whitening is not None:  # ‖D S‖ = ‖D Q diag(root)‖: Q is orthogonal
        D, W = (D @ whitening.Q) * whitening.root, (W @ whitening.Q) * whitening.root
    return float(D.square().sum() / W.square().sum().clamp_min(torch.finfo(W.dtype).tiny))
