"""Nested low-rank layers: factors U, V whose first `rank` columns are the active layer.

`NestedLinear` replaces `nn.Linear` (and GPT-2's transposed `Conv1D`); `NestedConv1d` and
`NestedConv2d` replace convolutions (groups = 1) by a rank-r convolution with the
original kernel followed by a 1×1 convolution. `rank` is settable at run time;
`rank = max_rank` is the original layer (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class _NestedFactors(nn.Module):
    """Owns U (out, R), V (in_flat, R), the optional bias and the active rank."""

    def __init__(self, out_features: int, in_flat: int, max_rank: int, bias: bool,
                 device=None, dtype=None):
        super().__init__()
        if not 0 < max_rank <= min(out_features, in_flat):
            raise ValueError(
                f"max_rank {max_rank} must be in [1, min({out_features}, {in_flat})]"
            )
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, max_rank, **kw))
        self.V = nn.Parameter(torch.empty(in_flat, max_rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.max_rank = max_rank
        self._rank = max_rank
        self._dense_at_max_rank: torch.Tensor | None = None  # see dense_at_max_rank()

    @property
    def rank(self) -> int:
        return self._rank

    @rank.setter
    def rank(self, value: int) -> None:
        value = int(value)
        if not 1 <= value <= self.max_rank:
            raise ValueError(f"rank {value} is out of range [1, {self.max_rank}]")
        self._rank = value

    def load_factors_(self, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.U.copy_(U)
            self.V.copy_(V)
            if self.bias is not None:
                self.bias.copy_(bias)

    def dense_weight(self, rank: int | None = None) -> torch.Tensor:
        """U_r V_rᵀ, the (out, in_flat) weight this layer computes at `rank`."""
        r = self.rank if rank is None else rank
        return self.U[:, :r] @ self.V[:, :r].T

    @property
    def weight(self) -> torch.Tensor:
        """The effective dense weight at the active rank, in the replaced layer's layout.

        Model code sometimes reads `layer.weight.dtype` or `.device`; this keeps it working.
        """
        return self.dense_weight().reshape(self._weight_shape())

    def _weight_shape(self) -> tuple[int, ...]:
        return tuple(self.U.shape[:1]) + tuple(self.V.shape[:1])

    def extra_repr(self) -> str:
        return f"rank={self.rank}, max_rank={self.max_rank}, bias={self.bias is not None}"


class NestedLinear(_NestedFactors):
    def __init__(self, in_features: int, out_features: int, max_rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(out_features, in_features, max_rank, bias, device, dtype)
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def from_linear(cls, linear: nn.Module, U: torch.Tensor, V: torch.Tensor) -> NestedLinear:
        """Build from an `nn.Linear` (or transformers' `Conv1D`) and its factors W ≈ U Vᵀ."""
        weight, bias = linear_weight(linear)
        m, n = weight.shape
        if U.shape[0] != m or V.shape[0] != n or U.shape[1] != V.shape[1]:
            raise ValueError(f"factors U{tuple(U.shape)} V{tuple(V.shape)} do not fit a "
                             f"({m}, {n}) weight")
        layer = cls(n, m, U.shape[1], bias is not None, weight.device, weight.dtype)
        layer.load_factors_(U, V, bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._rank
        if r == self.max_rank and self._dense_at_max_rank is not None:
            return F.linear(x, self._dense_at_max_rank, self.bias)
        return F.linear(F.linear(x, self.V[:, :r].T), self.U[:, :r], self.bias)  # (..., out)


@torch.no_grad()
def balance_factors_(layers: Iterable[nn.Module]) -> float | None:
    """Rescale, in place, every rank component i of each nested layer: U[:, i] · d_i and
    V[:, i] / d_i with d_i = sqrt(‖V_i‖ / ‖U_i‖), so that both columns get the norm
    sqrt(‖U_i‖ ‖V_i‖). U_r V_rᵀ is unchanged at every rank r, so every budget computes what
    it did (up to float rounding); only the optimizer sees a difference.

    Why: whitened DataSVD splits W S = P σ Rᵀ as U = P √σ, V = S⁻ᵀ R √σ, so V's scale is
    the inverse of the input's. On all-MiniLM-L6-v2 the median ‖U_i‖ / ‖V_i‖ was 30 (1,024
    calibration sentences) and 87 (8,192), and AdamW moves every entry by about lr a step,
    so V moved that much faster than U relative to its size. Unbalanced, β 0.8's held-out
    cosine first dipped (0.9739 → 0.9723 after 20 steps at lr 2e-5; at 1e-4 the training
    losses rose); balanced, it rose from the first evaluation (0.9758 at step 20)
    (BENCHMARKS.md, encoders, "Factor scale"). Unchanged budgets hold for float weights: a
    quantized export rounds U in blocks along the rank, so its error can change (not
    measured).

    layers: nested layers (U (out, R), V (in_flat, R)); components with a zero column are
    left as they are. Returns the median ‖U_i‖ / ‖V_i‖ before, over every component of every
    layer (None for no layers or no nonzero component)."""
    ratios = []
    for layer in layers:
        norm_u, norm_v = layer.U.float().norm(dim=0), layer.V.float().norm(dim=0)  # (R,)
        live = (norm_u > 0) & (norm_v > 0)
        d = torch.where(live, (norm_v / norm_u.where(live, 1.0)).sqrt(), 1.0)
        ratios.append((norm_u[live] / norm_v[live]).cpu())
        layer.U.copy_((layer.U.float() * d).to(layer.U.dtype))
        layer.V.copy_((layer.V.float() / d).to(layer.V.dtype))
    ratios = torch.cat(ratios) if ratios else torch.empty(0)
    return float(ratios.quantile(0.5)) if len(ratios) else None


@contextmanager
def dense_at_max_rank(layers: Iterable[nn.Module]):
    """While active, each `NestedLinear` of `layers` at its max rank R computes x Wᵀ with
    W = U Vᵀ (out, in), formed once on entry: one matmul of out·in multiply-adds per token
    instead of two of (out + in)·R (1.4-2× fewer at R = min(out, in)). For passes that do
    not change the factors (probing: every layer but the probed one sits at max rank);
    gradients do not reach U and V through W. Equal to the factored forward up to float
    rounding. Memory: one dense weight per layer, released on exit. Other layer types
    (convolutions) are left as they are."""
    layers = [layer for layer in layers if isinstance(layer, NestedLinear)]
    try:
        with torch.no_grad():
            for layer in layers:
                layer._dense_at_max_rank = layer.dense_weight(layer.max_rank).contiguous()
        yield
    finally:
        for layer in layers:
            layer._dense_at_max_rank = None


class _NestedConv(_NestedFactors):
    _conv = None  # F.conv1d or F.conv2d

    def __init__(self, conv: nn.Module, max_rank: int):
        in_flat = conv.in_channels * int(torch.tensor(conv.kernel_size).prod())
        super().__init__(conv.out_channels, in_flat, max_rank, conv.bias is not None,
                         conv.weight.device, conv.weight.dtype)
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @classmethod
    def from_conv(cls, conv: nn.Module, U: torch.Tensor, V: torch.Tensor):
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("only convolutions with groups=1 and zero padding can be factorised")
        layer = cls(conv, U.shape[1])
        layer.load_factors_(U, V, conv.bias.detach() if conv.bias is not None else None)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._rank
        kernel = self.V[:, :r].T.reshape(r, self.in_channels, *self.kernel_size)
        z = type(self)._conv(x, kernel, None, self.stride, self.padding, self.dilation)
        pointwise = self.U[:, :r].reshape(self.out_channels, r, *([1] * len(self.kernel_size)))
        return type(self)._conv(z, pointwise, self.bias)


class NestedConv1d(_NestedConv):
    _conv = staticmethod(F.conv1d)


class NestedConv2d(_NestedConv):
    _conv = staticmethod(F.conv2d)


NESTED_TYPES = (NestedLinear, NestedConv1d, NestedConv2d)


def is_transposed_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, bias) with W in (out, in_flat) layout for Linear, Conv1D, Conv1d and Conv2d."""
    weight = module.weight.detach()
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    if is_transposed_conv1d(module):
        return weight.T, bias
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return weight.reshape(weight.shape[0], -1), bias
    return weight, bias


def nested_from_module(module: nn.Module, U: torch.Tensor, V: torch.Tensor) -> nn.Module:
    """The nested replacement for `module` given its factors."""
    if isinstance(module, nn.Conv2d):
        return NestedConv2d.from_conv(module, U, V)
    if isinstance(module, nn.Conv1d):
        return NestedConv1d.from_conv(module, U, V)
    return NestedLinear.from_linear(module, U, V)
