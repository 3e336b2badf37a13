"""Export-friendly copies of a nested model at one budget.

Every `NestedLinear` / `NestedConv*` is replaced by a plain module computing the chosen
deployment form (`flexrank.exporters.common.gauge.choose_form`): one dense matmul, a
gauge-fixed pair with an identity block (Concat of z and Û z), or plain factors. The ONNX
graph then holds MatMuls over exactly those weights. `FactorLinear` is the rank-major form
used by the `shared` and `elastic` layouts: Vᵀ (r, n) and Uᵀ (r, m), whose first rows are
the nested rank prefix.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from flexrank.compress.config import _checked_dict
from flexrank.compress.depth_layers import relink_donors_
from flexrank.compress.layers import NestedLinear
from flexrank.compress.select import nested_layers
from flexrank.compress.surgery import swap_modules_
from flexrank.exporters.common.gauge import (
    MAX_CONDITION,
    LayerForm,
    choose_form,
    gauge_fix,
    leading_condition,
)
from flexrank.planning.costs import gauge_fixed_params, plain_params
from flexrank.planning.latency_table import LatencyTable


@dataclass(frozen=True)
class LayerExport:
    """How one layer was deployed at one budget (recorded in the manifest)."""

    name: str
    shape: tuple[int, int]  # (out, in_flat)
    rank: int
    form: str  # LayerForm value, or "factors" for the shared/elastic layouts
    condition: float | None  # scale-free cond of U[:r,:r] (None at full rank)
    params: int  # numbers stored for this layer, bias excluded

    def to_dict(self) -> dict:
        return asdict(self)


def _as_param(t: torch.Tensor, dtype) -> nn.Parameter:
    return nn.Parameter(t.detach().to(dtype).contiguous(), requires_grad=False)


class DenseLinear(nn.Module):
    def __init__(self, weight, bias, dtype):
        super().__init__()
        self.weight = _as_param(weight, dtype)  # (m, n)
        self.bias = None if bias is None else _as_param(bias, dtype)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class GaugeLinear(nn.Module):
    """y = Concat(z, Û z) + b with z = V̂ᵀ x: leading rows are the pivots (no reordering)."""

    def __init__(self, V_hat, U_rest, bias, dtype):
        super().__init__()
        self.V_hat_t = _as_param(V_hat.T, dtype)  # (r, n)
        self.U_rest = _as_param(U_rest, dtype)  # (m - r, r)
        self.bias = None if bias is None else _as_param(bias, dtype)

    def forward(self, x):
        z = F.linear(x, self.V_hat_t)  # (..., r)
        y = torch.cat([z, F.linear(z, self.U_rest)], dim=-1)  # (..., m)
        return y if self.bias is None else y + self.bias


class FactorLinear(nn.Module):
    """Plain factors y = U_r (V_rᵀ x) + b, stored rank-major: Vt (r, n), Ut (r, m)."""

    def __init__(self, U, V, bias, dtype):
        super().__init__()
        self.Vt = _as_param(V.T, dtype)
        self.Ut = _as_param(U.T, dtype)
        self.bias = None if bias is None else _as_param(bias, dtype)

    def forward(self, x):
        y = torch.matmul(torch.matmul(x, self.Vt.t()), self.Ut)  # (..., r) -> (..., m)
        return y if self.bias is None else y + self.bias


class _ConvForm(nn.Module):
    """Convolution forms: dense kernel, gauge-fixed (rank-r conv, Concat with a 1×1 conv of
    it) or plain (rank-r conv then 1×1 conv)."""

    def __init__(self, layer, form, kernels, bias, dtype):
        super().__init__()
        self.form = form
        self.conv = F.conv1d if len(layer.kernel_size) == 1 else F.conv2d
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        self.first = _as_param(kernels[0], dtype)
        self.second = None if kernels[1] is None else _as_param(kernels[1], dtype)
        self.bias = None if bias is None else _as_param(bias, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel (out, in, *kernel) this form computes. Model code reads it for
        its dtype or device (ViT's patch embedding checks pixel_values against
        `projection.weight.dtype`); traced, it is dead code and leaves the graph."""
        if self.form == LayerForm.DENSE:
            return self.first
        second = self.second.flatten(1)  # (m or m − r, r): a 1×1 conv
        if self.form == LayerForm.GAUGE:
            second = torch.cat([torch.eye(second.shape[1], dtype=second.dtype,
                                          device=second.device), second])
        return torch.einsum("mr,r...->m...", second, self.first)

    def forward(self, x):
        args = (self.stride, self.padding, self.dilation)
        if self.form == LayerForm.DENSE:
            return self.conv(x, self.first, self.bias, *args)
        z = self.conv(x, self.first, None, *args)  # (B, r, ...)
        if self.form == LayerForm.PLAIN:
            return self.conv(z, self.second, self.bias)
        y = torch.cat([z, self.conv(z, self.second)], dim=1)  # (B, m, ...)
        if self.bias is None:
            return y
        return y + self.bias.reshape(1, -1, *([1] * (y.dim() - 2)))


def _conv_module(layer, form, rank, U, V, fixed, bias, dtype):
    m, r = layer.out_channels, rank
    ones = [1] * len(layer.kernel_size)
    if form == LayerForm.DENSE:
        kernels = ((U[:, :r] @ V[:, :r].T).reshape(m, layer.in_channels, *layer.kernel_size),
                   None)
    elif form == LayerForm.GAUGE:
        kernels = (fixed.V_hat.T.reshape(r, layer.in_channels, *layer.kernel_size),
                   fixed.U_rest.reshape(m - r, r, *ones))
    else:
        kernels = (V[:, :r].T.reshape(r, layer.in_channels, *layer.kernel_size),
                   U[:, :r].reshape(m, r, *ones))
    return _ConvForm(layer, form, kernels, bias, dtype)


@dataclass(frozen=True)
class FormPolicy:
    """How `choose_form` decides (see flexrank/gauge.py)."""

    max_condition: float = MAX_CONDITION
    latency: object | None = None  # a plan.latency_table.LatencyTable: decide by measured time
    force_form: str | None = None  # "plain", "dense" or "gauge" below full rank (benchmarks)
    gauge_fixing: bool = True  # False: plain factors or dense only (quantized exports)
    version: int = 1

    def __post_init__(self):
        if self.force_form not in (None, "plain", "dense", "gauge"):
            raise ValueError(f"force_form {self.force_form!r} is not 'plain', 'dense' or "
                             "'gauge'")
        if not self.max_condition >= 1:
            raise ValueError(f"max_condition {self.max_condition} must be >= 1")

    def to_dict(self) -> dict:
        """JSON-ready, with a type and version tag; `latency` must be a LatencyTable.

        Raises ValueError if `latency` is another kind of object (it cannot be written)."""
        if self.latency is not None and not isinstance(self.latency, LatencyTable):
            raise ValueError(f"FormPolicy.latency of type {type(self.latency).__name__} cannot "
                             "be serialised; only a LatencyTable (measure_latency_table) can")
        return {"type": "FormPolicy", "max_condition": self.max_condition,
                "latency": None if self.latency is None else self.latency.to_dict(),
                "force_form": self.force_form, "gauge_fixing": self.gauge_fixing,
                "version": self.version}

    @classmethod
    def from_dict(cls, data: dict) -> FormPolicy:
        """The policy `to_dict` wrote; ValueError on another type tag, version or field."""
        data = _checked_dict(cls, data)
        if data.get("latency") is not None:
            try:
                data["latency"] = LatencyTable.from_dict(data["latency"])
            except (KeyError, TypeError) as err:
                raise ValueError(f"FormPolicy.latency is not a latency table ({err!r}); "
                                 "write it with LatencyTable.to_dict") from None
        return cls(**data)


def quantized_policy(policy: FormPolicy) -> FormPolicy:
    """`policy` for an export with quantized weights and activations (int8, 8da4w): gauge
    fixing ruled out, so each layer is plain factors or dense; `force_form` still wins.

    Why: the gauge-fixed layer rebuilds its non-pivot outputs from the pivot ones,
    y[r:] = Û_rest z with Û_rest = U[r:] U[:r]⁻¹, whose norm is about the condition number of
    U[:r]. Any relative error in z, from quantizing x, V̂ᵀ or z
    itself, reaches y[r:] multiplied by ‖Û_rest‖₂: harmless at float32's 6e-8, fatal at
    int8's ~1e-2. Plain factors as factorised (U = P √σ, V = R √σ) are balanced and add no
    such amplification. Measured (onnxruntime dynamic int8, per-channel weights):

    - tiny Llama, β = 0.5: per layer relative output error 0.05-0.73 gauge-fixed, 0.02-0.03
      plain, 0.01-0.03 dense;
    - SmolLM2-135M (DataSVD, uniform plan), β = 0.5: ‖Û_rest‖₂ 51 to 3.7e5 (median 846)
      over 210 layers; per layer error plain 0.030 vs dense 0.028 (median); top-1 agreement
      with PyTorch 0.00 gauge-fixed, 0.64 plain on the export's 42-position sample and
      0.79 on 256 held-out positions, where the dense β = 1 graph gives 0.89 and 0.81.
    """
    return replace(policy, gauge_fixing=False)


def deploy_layer(name: str, layer: nn.Module, rank: int, factors_only: bool = False,
                 policy: FormPolicy = FormPolicy()) -> tuple[nn.Module, LayerExport]:
    """The export module for `layer` at `rank`, and what was chosen."""
    U = layer.U.detach().double()
    V = layer.V.detach().double()
    m, n = U.shape[0], V.shape[0]
    bias = None if layer.bias is None else layer.bias.detach()
    dtype = layer.U.dtype
    if factors_only:
        if not isinstance(layer, NestedLinear):
            raise NotImplementedError(f"layer {name}: the shared and elastic layouts support "
                                      "linear layers only; export convolutions per budget")
        module = FactorLinear(U[:, :rank], V[:, :rank], bias, dtype)
        return module, LayerExport(name, (m, n), rank, "factors", None,
                                   plain_params(m, n, rank))
    condition = leading_condition(U, rank) if rank < min(m, n) else None
    # an unknown condition rules gauge fixing out (`choose_form`)
    form = choose_form(m, n, rank, condition if policy.gauge_fixing else None,
                       policy.max_condition, latency=policy.latency)
    if policy.force_form is not None and rank < min(m, n):
        form = LayerForm(policy.force_form)
    fixed = gauge_fix(U, V, rank) if form == LayerForm.GAUGE else None
    params = {LayerForm.DENSE: m * n, LayerForm.GAUGE: gauge_fixed_params(m, n, rank),
              LayerForm.PLAIN: plain_params(m, n, rank)}[form]
    record = LayerExport(name, (m, n), rank, form.value, condition, params)
    if not isinstance(layer, NestedLinear):
        return _conv_module(layer, form, rank, U, V, fixed, bias, dtype), record
    if form == LayerForm.DENSE:
        return DenseLinear(U[:, :rank] @ V[:, :rank].T, bias, dtype), record
    if form == LayerForm.GAUGE:
        return GaugeLinear(fixed.V_hat, fixed.U_rest, bias, dtype), record
    return FactorLinear(U[:, :rank], V[:, :rank], bias, dtype), record


def deployable_model(model: nn.Module, ranks: dict[str, int], factors_only: bool = False,
                     policy: FormPolicy = FormPolicy(),
                     layer_forms: dict[str, str] | None = None,
                     ) -> tuple[nn.Module, list[LayerExport]]:
    """A copy of `model` with every nested layer replaced by its export module at `ranks`;
    `layer_forms` ({layer: "dense" | "plain" | "gauge"}) forces those layers' forms below
    full rank (int4's per-layer choice by output error), the others follow `policy`.

    The caller's model is not modified.
    """
    layer_forms = layer_forms or {}
    copied = copy.deepcopy(model)
    layers = nested_layers(copied)
    records = []

    def deployed(name: str, layer: nn.Module) -> nn.Module | None:
        if name not in layers:
            return None
        forced = replace(policy, force_form=layer_forms[name]) if name in layer_forms else policy
        module, record = deploy_layer(name, layer, ranks.get(name, layer.max_rank),
                                      factors_only, forced)
        records.append(record)
        return module

    swap_modules_(copied, deployed)
    relink_donors_(copied)  # a replaced block's shared layers: the donor's deployed form
    return copied.eval(), records
