"""8-bit dynamic activations with 4-bit grouped weights ("8da4w") for ExecuTorch's XNNPACK
backend, through torchao.

torchao's `Int8DynamicActivationIntxWeightConfig(int4, PerGroup(g))` quantizes the weight
of an `nn.Linear` in groups of g along its *input* axis, so a layer whose input width is
not a multiple of g cannot be quantized (ExecuTorch's own export then skips it silently,
DESIGN.md §4.3). In a factorised layer the inner width is the rank, so:

- `aligned_ranks` (exporters/common/ranks.py) rounds every nested layer's rank to the
  nearest multiple of g (at least g, at most the layer's max rank); rounding is monotone,
  so a nested plan stays nested;
- `linear_forms_` turns the deployment forms of `deploy.py` into plain `nn.Linear`
  children (the modules torchao quantizes): dense W, gauge-fixed V̂ᵀ and Û_rest, plain
  Vᵀ and U;
- `quantize_8da4w_` quantizes every `nn.Linear` and returns which layers were quantized.
  A factorised layer that still cannot be quantized is an error naming it; other linears
  (a head of odd width) stay in float32 with a warning and are reported. The input
  embedding is quantized weight-only (8-bit per row or 4-bit in groups), which the
  lowering fuses into ExecuTorch's quantized embedding op.

As ExecuTorch's own LLM export (executorch/extension/llm/export/quantize.py and
examples/models/llama/source_transformation/quantize.py): every `nn.Linear`, the lm_head
included, is 8da4w with HQQ scales (`intx_choose_qparams_algorithm="hqq_scale_only"`);
the embedding is `IntxWeightOnlyConfig` with HQQ scales (their `-E 8,0` / `4,32`).

Scales are rounded to bfloat16 *before* the int4 codes are computed
(`weight_scale_dtype=torch.bfloat16`, then held as float32). Why: ExecuTorch's XNNPACK
serializer stores the scales of group-wise int4 weights as bfloat16
(`backends/xnnpack/operators/node_visitor.py`, `get_quant_params`), so float32 scales
became other weights in the program than in the eager model (relative change up to
2⁻⁹ per group). One linear differed from eager by 0.1-0.3 % of its output norm; through
SmolLM2-135M's 30 layers the program agreed with its eager twin on only 0.68 of top-1
tokens. With bfloat16-exact scales the program computes what the eager model computes
(1e-7 relative per linear).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from flexrank.compress.surgery import swap_modules_
from flexrank.exporters.common.forms import DenseLinear, FactorLinear, GaugeLinear

logger = logging.getLogger(__name__)

QUANTIZE_8DA4W = "8da4w"
# torchao's int4 grouping and XNNPACK's blockwise kernels accept these group sizes.
GROUP_SIZES = (32, 64, 128, 256)
EMBEDDING_BITS = (8, 4)  # ExecuTorch's quantized embedding ops: embedding_byte, embedding_4bit


class QuantizationShapeError(ValueError):
    """A layer whose shape the chosen quantization cannot handle."""


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.requires_grad_(False)


class GaugeLinearQ(nn.Module):
    """`GaugeLinear` over two `nn.Linear`s: y = Concat(z, Û_rest z) + b, z = V̂ᵀ x."""

    def __init__(self, form: GaugeLinear):
        super().__init__()
        self.down = _linear(form.V_hat_t)  # (r, n): input width n
        self.up = _linear(form.U_rest)  # (m - r, r): input width r
        self.bias = form.bias

    def forward(self, x):
        z = self.down(x)  # (..., r)
        y = torch.cat([z, self.up(z)], dim=-1)  # (..., m)
        return y if self.bias is None else y + self.bias


class FactorLinearQ(nn.Module):
    """`FactorLinear` over two `nn.Linear`s: y = U (Vᵀ x) + b."""

    def __init__(self, form: FactorLinear):
        super().__init__()
        self.down = _linear(form.Vt)  # (r, n)
        self.up = _linear(form.Ut.T, form.bias)  # (m, r)

    def forward(self, x):
        return self.up(self.down(x))


def linear_forms_(model: nn.Module) -> nn.Module:
    """Replace the linear deployment forms of `model` (in place) by `nn.Linear` children."""
    swaps = {DenseLinear: lambda f: _linear(f.weight, f.bias), GaugeLinear: GaugeLinearQ,
             FactorLinear: FactorLinearQ}

    def linear(_name: str, module: nn.Module) -> nn.Module | None:
        build = swaps.get(type(module))
        return None if build is None else build(module)

    return swap_modules_(model, linear)


@dataclass(frozen=True)
class QuantizationReport:
    scheme: str
    group_size: int
    quantized: tuple[str, ...]  # module names whose weight is int4
    skipped: dict  # {module name: why it stayed float32}
    embeddings: tuple[str, ...] = ()  # weight-only quantized embeddings
    embedding_bits: int | None = None

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "group_size": self.group_size,
                "quantized": list(self.quantized), "skipped": dict(self.skipped),
                "scales": "hqq_scale_only, bfloat16",
                "embeddings": list(self.embeddings), "embedding_bits": self.embedding_bits}


def quantize_8da4w_(model: nn.Module, nested_names, group_size: int = 32,
                    embedding_bits: int | None = 8) -> QuantizationReport:
    """Quantize every `nn.Linear` of a deployed model in place (after `linear_forms_`).

    `nested_names`: the factorised layers; each must end up quantized (its sub-linears
    `<name>.down` / `<name>.up`, or `<name>` when dense), else `QuantizationShapeError`.
    `embedding_bits`: the input embedding's weight-only bits (8, 4 or None for float32).
    """
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, quantize_

    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not supported by 8da4w; choose one of "
                         f"{list(GROUP_SIZES)}")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    bad = {n: tuple(m.weight.shape) for n, m in linears.items()
           if m.in_features % group_size}
    owners = {name: next((layer for layer in nested_names
                          if name == layer or name.startswith(layer + ".")), None)
              for name in bad}
    nested_bad = {name: shape for name, shape in bad.items() if owners[name] is not None}
    if nested_bad:
        name, shape = next(iter(nested_bad.items()))
        raise QuantizationShapeError(
            f"8da4w cannot quantize {owners[name]} ({name}, weight {shape}): its input width "
            f"{shape[1]} is not a multiple of the group size {group_size}. Choose a group size "
            f"that divides every layer's input width, or export with quantize=None "
            f"({len(nested_bad)} such layer(s))")
    skipped = {name: f"input width {shape[1]} is not a multiple of {group_size}"
               for name, shape in bad.items()}
    for layer in nested_names:
        if not any(n == layer or n.startswith(layer + ".") for n in linears):
            skipped[layer] = "a convolution: 8da4w quantizes linear layers only"
    for name, why in skipped.items():
        logger.warning("8da4w: %s stays float32 (%s)", name, why)
    embeddings = quantize_embeddings_(model, embedding_bits, group_size)
    config = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(group_size),
        weight_scale_dtype=torch.bfloat16,  # what XNNPACK stores (see the module docstring)
        intx_choose_qparams_algorithm="hqq_scale_only")
    quantize_(model, config,
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn not in skipped)
    _float32_scales_(model)
    quantized = tuple(n for n in linears if n not in skipped)  # convolutions are not here
    return QuantizationReport(QUANTIZE_8DA4W, group_size, quantized, skipped, embeddings,
                              embedding_bits if embeddings else None)


def quantize_embeddings_(model: nn.Module, bits: int | None, group_size: int) -> tuple[str, ...]:
    """Weight-only quantization of every `nn.Embedding` (in place, before the linears, so a
    tied lm_head is quantized from the float table): `bits` 8 per row (one scale per
    token, ExecuTorch's `-E 8,0`), 4 in groups of `group_size` (`-E 4,<g>`), None: none.
    The lowering (`do_quant_fusion_and_const_prop`) turns the dequantize + gather into
    `quantized_decomposed::embedding_byte` / `embedding_4bit`. Returns the names."""
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import IntxWeightOnlyConfig, quantize_

    if bits is None:
        return ()
    if bits not in EMBEDDING_BITS:
        raise ValueError(f"embedding_bits {bits} is not supported; choose one of "
                         f"{list(EMBEDDING_BITS)} or None (float32)")
    names = tuple(n for n, m in model.named_modules() if isinstance(m, nn.Embedding))
    if not names:
        return ()
    granularity = PerAxis(0) if bits == 8 else PerGroup(group_size)
    widths = {n: model.get_submodule(n).embedding_dim for n in names}
    if bits == 4 and any(w % group_size for w in widths.values()):
        raise QuantizationShapeError(f"4-bit embeddings need widths that are multiples of the "
                                     f"group size {group_size}: {widths}; use "
                                     "embedding_bits=8")
    config = IntxWeightOnlyConfig(weight_dtype=torch.int8 if bits == 8 else torch.int4,
                                  granularity=granularity,
                                  intx_choose_qparams_algorithm="hqq_scale_only")
    for name in names:  # padding_idx only shapes gradients, but ExecuTorch's fusion
        model.get_submodule(name).padding_idx = None  # matches embedding(table, ids) only
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    return names


def _float32_scales_(model: nn.Module) -> None:
    """Quantized weights' bfloat16 scales held as float32 (the same values): the exported
    graph stays float32 throughout, as XNNPACK's partitioner expects."""
    for module in model.modules():
        scale = getattr(getattr(module, "weight", None), "scale", None)
        if isinstance(scale, torch.Tensor) and scale.dtype == torch.bfloat16:
            module.weight.scale = scale.float()
