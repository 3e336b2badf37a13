"""Fake quantization of a nested model as it ships in 4 bits, for quantization-aware
distillation (`DistillConfig.qat`) and for measuring quality per precision in PyTorch.

Two schemes, each reproducing what an exporter of this project stores:

- ``"int4"``: onnxruntime's `MatMulNBits` as `MatMulNBitsQuantizer` (RTN) writes it
  (exporters/onnx/convert.py `quantize_int4`: block 32, symmetric). A MatMul weight
  B (K, N) is cut into blocks of b along K for each column; a torch `Linear` weight
  W (out, in) is Bᵀ, so the blocks run along W's last axis. Per block (MLAS
  `BlockwiseQuantizer`, onnxruntime/core/mlas/lib/q4_dq.cpp):
  symmetric: m = the entry of largest magnitude (the positive one on a tie),
  scale = −m / 8, q = clamp(⌊w / scale + 8 + ½⌋, 0, 15), ŵ = (q − 8) · scale;
  asymmetric: lo = min(min w, 0), hi = max(max w, 0), scale = (hi − lo) / 15,
  zero = clamp(round(−lo / scale), 0, 15), q = clamp(⌊w / scale + zero + ½⌋, 0, 15),
  ŵ = (q − zero) · scale. A last partial block is padded with zeros. All in float32
  with 1 / scale computed first, as MLAS does, so ŵ equals the dequantized stored weight
  bit for bit (tests/test_qat.py checks it against onnxruntime's quantizer).
  Activations stay float, except that `accuracy_level` 4 lets the kernel quantize each
  activation block of b along K to int8 (`fake_quantize_int8_blocks`).
- ``"8da4w"``: torchao's `Int8DynamicActivationIntxWeightConfig(int4, PerGroup(g))`
  (exporters/executorch/quant.py): weights symmetric int4 per group of g along the input
  axis, activations int8 per token, asymmetric. The fake quantizers are torchao's own QAT
  ones (`torchao.quantization.qat.IntxFakeQuantizer`, the configs torchao's `QATConfig`
  derives from that base config).

A factorised layer ships as one MatMul per factor (plain factors: Vᵣᵀ (r, n) then
Uᵣ (m, r)) or, near full rank, as one dense matrix UᵣVᵣᵀ; each exported weight is
quantized on its own (`deployed_form` is the exporters' rule for quantized exports, which
never gauge-fix). Ranks are rounded to the block size as the exporters round them
(`flexrank.planning.alignment.aligned_rank`). Because the blocks of Vᵣᵀ run along n
within a rank row and those of Uᵣ along the rank axis, the quantized factors of a rank
prefix that is a multiple of b are the prefix of the quantized full factors: nested plans
stay nested in 4 bits.

Gradients: straight-through estimator (∂ŵ/∂w = 1), as torchao's QAT.

References: onnxruntime `matmul_nbits_quantizer.py` and MLAS `q4_dq.cpp`; torchao
`quantization/qat/fake_quantizer.py`; Bengio et al. 2013 (straight-through estimator).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from flexrank.compress.config import QAT_BLOCK_SIZES, DistillConfig
from flexrank.compress.layers import NestedLinear
from flexrank.planning.alignment import aligned_rank
from flexrank.planning.costs import plain_params

QAT_SCHEMES = tuple(QAT_BLOCK_SIZES)  # "int4", "8da4w"
# MatMulNBits accepts these blocks (onnxruntime-genai's builder and our export use 32)
INT4_BLOCK_SIZES = QAT_BLOCK_SIZES["int4"]
# torchao's int4 grouping and XNNPACK's blockwise kernels accept these group sizes
GROUP_SIZES_8DA4W = QAT_BLOCK_SIZES["8da4w"]
# Quantized exports deploy a layer dense when plain factors would cost more than this
# fraction of m·n (exporters/common/gauge.py DENSE_FRACTION; tests check they agree).
DENSE_FRACTION = 0.9


def _ste(weight: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """`quantized` in the forward, the identity's gradient in the backward."""
    return weight + (quantized - weight).detach()


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    # MLAS rounds with roundf on a non-negative value: halves go up (not to even)
    return torch.floor(x + 0.5)


@torch.no_grad()
def _blockwise(weight: torch.Tensor, bits: int, block_size: int,
               symmetric: bool) -> torch.Tensor:
    """The dequantized MatMulNBits weight (float32, same shape) of W (out, in)."""
    w = weight.detach().float()
    out, k = w.shape
    top = float(2**bits - 1)  # largest code
    middle = float(2 ** (bits - 1))  # the implied zero point of symmetric blocks
    blocks = -(-k // block_size)
    padded = F.pad(w, (0, blocks * block_size - k)).reshape(out, blocks, block_size)
    low, high = padded.amin(-1), padded.amax(-1)  # (out, blocks); padding zeros included
    if symmetric:
        extreme = torch.where(high.abs() > low.abs(), high, low)
        scale = -extreme / middle  # maps the larger half to the negative codes
        zero = torch.full_like(scale, middle)
    else:
        low, high = low.clamp(max=0.0), high.clamp(min=0.0)
        scale = (high - low) / top
        zero_float = torch.where(scale != 0, -low / torch.where(scale != 0, scale, 1.0), low)
        zero = _round_half_up(zero_float).clamp(0.0, top)
    reciprocal = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, 1.0), 0.0)
    codes = _round_half_up(padded * reciprocal[..., None] + zero[..., None]).clamp(0.0, top)
    dequantized = (codes - zero[..., None]) * scale[..., None]  # (out, blocks, block)
    return dequantized.reshape(out, blocks * block_size)[:, :k]


def fake_quantize_blockwise(weight: torch.Tensor, bits: int = 4, block_size: int = 32,
                            symmetric: bool = True) -> torch.Tensor:
    """W (out, in) as onnxruntime's `MatMulNBits` (bits 4 or 8) stores it after RTN
    quantization of the MatMul weight Wᵀ (K = in, N = out): blocks of `block_size` along
    `in` (the module docstring gives the formula; 8 bits: 256 codes, zero point 128).
    Returns a tensor of W's shape and dtype whose values are the dequantized weight
    (computed in float32) and whose gradient is the identity's.

    Raises ValueError for a weight that is not 2-D, bits other than 4 and 8, or a block
    size MatMulNBits refuses."""
    if weight.dim() != 2:
        raise ValueError(f"blockwise fake quantization takes a 2-D (out, in) weight, got "
                         f"shape {tuple(weight.shape)}")
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits stores 4 or 8 bits, not {bits}")
    if block_size not in INT4_BLOCK_SIZES:
        raise ValueError(f"block size {block_size} is not one MatMulNBits takes; choose "
                         f"one of {list(INT4_BLOCK_SIZES)}")
    quantized = _blockwise(weight, bits, block_size, symmetric).to(weight.dtype)
    return _ste(weight, quantized)


def fake_quantize_int4(weight: torch.Tensor, block_size: int = 32,
                       symmetric: bool = True) -> torch.Tensor:
    """`fake_quantize_blockwise` at 4 bits: W (out, in) as the exporter's int4 MatMulNBits
    holds it (blocks along `in`). Same shape and dtype; straight-through gradient."""
    return fake_quantize_blockwise(weight, 4, block_size, symmetric)


def fake_quantize_int8_blocks(x: torch.Tensor, block_size: int = 32) -> torch.Tensor:
    """Activations x (..., K) as `MatMulNBits` with accuracy_level 4 quantizes them before
    its integer kernel: per block of `block_size` along K, symmetric int8 with
    scale = max|x| / 127 (MLAS `QuantizeARow_CompInt8`). The kernels round half to even
    (vector code) or away from zero (scalar code), so this matches onnxruntime to within
    one code on ties, not bit for bit. Straight-through gradient."""
    k = x.shape[-1]
    blocks = -(-k // block_size)
    with torch.no_grad():
        padded = F.pad(x.detach().float(), (0, blocks * block_size - k))
        padded = padded.reshape(*x.shape[:-1], blocks, block_size)
        scale = padded.abs().amax(-1, keepdim=True) / 127.0
        safe = torch.where(scale != 0, scale, 1.0)
        codes = torch.round(padded / safe).clamp(-127, 127)
        quantized = (codes * scale).reshape(*x.shape[:-1], blocks * block_size)[..., :k]
    return _ste(x, quantized.to(x.dtype))


def _torchao_fake_quantizers(group_size: int):
    """torchao's QAT fake quantizers for 8da4w: (activations, weights), as its `QATConfig`
    derives them from `Int8DynamicActivationIntxWeightConfig(torch.int4, PerGroup(g))`."""
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weights = IntxFakeQuantizeConfig(torch.int4, PerGroup(group_size), is_symmetric=True)
    return IntxFakeQuantizer(activations), IntxFakeQuantizer(weights)


# 8da4w weight scales: "hqq_bf16" as exporters/executorch/quant.py stores them (ExecuTorch's
# LLM export: HQQ scale-only search, scales rounded to bfloat16 as XNNPACK keeps them);
# "absmax": torchao's QAT fake quantizer (max |w| / 7.5 per group, float32 scales)
SCALES_8DA4W = ("hqq_bf16", "absmax")


def _torchao_dequantized(weight: torch.Tensor, config) -> torch.Tensor:
    """W (out, in) quantized by torchao's `quantize_(…, config)` as the exporter does it,
    dequantized to float32 (bfloat16 scales held as float32 first, as the exporter's
    `_float32_scales_`). No gradient."""
    from torchao.quantization.quant_api import quantize_

    with torch.no_grad():
        holder = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
        holder[0].weight.data = weight.detach().float().clone()
        quantize_(holder, config)
        quantized = holder[0].weight
        if getattr(quantized, "scale", None) is not None \
                and quantized.scale.dtype == torch.bfloat16:
            quantized.scale = quantized.scale.float()
        return quantized.dequantize().float()


def fake_quantize_8da4w(weight: torch.Tensor, group_size: int = 32,
                        scales: str = "hqq_bf16") -> torch.Tensor:
    """W (out, in) as 8da4w stores it: symmetric int4 per group of `group_size` along
    `in`. `scales` "hqq_bf16": torchao's `Int8DynamicActivationIntxWeightConfig` with HQQ
    scale-only search and bfloat16 scales, the exporter's call (exporters/executorch/
    quant.py), straight-through gradient; "absmax": torchao's QAT weight fake quantizer
    (its gradient also flows through the scales).

    Raises ValueError when `in` is not a multiple of `group_size` (the exporter would leave
    such a layer in float), for a group size XNNPACK does not take, or unknown `scales`."""
    if weight.dim() != 2:
        raise ValueError(f"fake_quantize_8da4w takes a 2-D (out, in) weight, got shape "
                         f"{tuple(weight.shape)}")
    _check_group(weight.shape[1], group_size)
    if scales == "absmax":
        return _torchao_fake_quantizers(group_size)[1](weight)
    if scales != "hqq_bf16":
        raise ValueError(f"8da4w scales {scales!r} is not one of {list(SCALES_8DA4W)}")
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig

    config = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(group_size),
        weight_scale_dtype=torch.bfloat16, intx_choose_qparams_algorithm="hqq_scale_only")
    return _ste(weight, _torchao_dequantized(weight, config).to(weight.dtype))


def fake_quantize_embedding_8da4w(table: torch.Tensor, bits: int = 8,
                                  group_size: int = 32) -> torch.Tensor:
    """An embedding table (vocab, hidden) as an 8da4w export stores it, weight-only:
    `bits` 8 with one scale per row, 4 in groups of `group_size` (torchao's
    `IntxWeightOnlyConfig` with HQQ scale-only search: exporters/executorch/quant.py
    `quantize_embeddings_`, ExecuTorch's `-E 8,0` / `-E 4,g`). Straight-through gradient."""
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import IntxWeightOnlyConfig

    if bits not in (4, 8):
        raise ValueError(f"8da4w embeddings are stored in 8 or 4 bits, not {bits}")
    config = IntxWeightOnlyConfig(weight_dtype=torch.int8 if bits == 8 else torch.int4,
                                  granularity=PerAxis(0) if bits == 8 else PerGroup(group_size),
                                  intx_choose_qparams_algorithm="hqq_scale_only")
    return _ste(table, _torchao_dequantized(table, config).to(table.dtype))


def fake_quantize_per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """Activations x (..., K) as 8da4w quantizes them at run time: int8 per token (row),
    asymmetric, through torchao's QAT activation fake quantizer."""
    return _torchao_fake_quantizers(GROUP_SIZES_8DA4W[0])[0](x)


def _check_group(width: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES_8DA4W:
        raise ValueError(f"8da4w group size {group_size} is not supported; choose one of "
                         f"{list(GROUP_SIZES_8DA4W)}")
    if width % group_size:
        raise ValueError(f"8da4w cannot quantize an input width of {width}: not a multiple "
                         f"of the group size {group_size}; choose a group size that divides it")


def deployed_form(m: int, n: int, rank: int, dense_fraction: float = DENSE_FRACTION) -> str:
    """How a quantized export deploys an m×n layer at `rank`: "dense" (one m×n MatMul) at
    full rank or when plain factors would cost more than `dense_fraction`·m·n, else
    "plain" (Vᵣᵀ then Uᵣ). The rule of `exporters.common.gauge.choose_form` with gauge
    fixing ruled out (`exporters.common.forms.quantized_policy`)."""
    if rank >= min(m, n) or plain_params(m, n, rank) > dense_fraction * m * n:
        return "dense"
    return "plain"


@dataclass(frozen=True)
class QuantSpec:
    """One deployed precision: the scheme and its block (int4) or group (8da4w) size.

    `activations`: also fake-quantize the activations as the runtime does (8da4w: int8
    per token, always on the device; int4: int8 blocks, what accuracy_level 4 does).
    `align_ranks`: compute nested layers at their rank rounded to the block size, the rank
    the exporters ship (`flexrank.planning.alignment.aligned_rank`)."""

    scheme: str = "int4"
    block_size: int = 32
    symmetric: bool = True  # int4 only: zero point 8 implied (the exporter's default)
    activations: bool = True
    align_ranks: bool = True
    # The embedding table's bits; None: the exporter's default for the scheme.
    # int4: the tied embedding / lm_head table, 4 (default) or 8 (OnnxExportConfig.
    # int4_embedding_bits: one table in blocks along the hidden axis, read by the lm_head
    # MatMulNBits and the embedding's GatherBlockQuantized) or 32 (float).
    # 8da4w: the input embedding, weight-only, 8 per row (default), 4 grouped or 32
    # (ExecutorchExportConfig.embedding_bits); a tied lm_head is 8da4w like any Linear.
    embedding_bits: int | None = None
    scales: str = "hqq_bf16"  # 8da4w only: SCALES_8DA4W

    def __post_init__(self):
        if self.scheme not in QAT_SCHEMES:
            raise ValueError(f"quantization scheme {self.scheme!r} is not one of "
                             f"{list(QAT_SCHEMES)}")
        sizes = INT4_BLOCK_SIZES if self.scheme == "int4" else GROUP_SIZES_8DA4W
        if self.block_size not in sizes:
            raise ValueError(f"{self.scheme} block size {self.block_size} is not supported; "
                             f"choose one of {list(sizes)}")
        if self.embedding_bits is None:
            object.__setattr__(self, "embedding_bits", 4 if self.scheme == "int4" else 8)
        if self.embedding_bits not in (4, 8, 32):
            raise ValueError(f"embedding_bits {self.embedding_bits} must be 4, 8 or 32")
        if self.scales not in SCALES_8DA4W:
            raise ValueError(f"scales {self.scales!r} is not one of {list(SCALES_8DA4W)}")

    def weight(self, w: torch.Tensor, bits: int = 4) -> torch.Tensor:
        """(out, in) -> its fake-quantized value (straight-through gradient); `bits` 8:
        an int4 export's 8-bit tied table."""
        if self.scheme == "int4":
            return fake_quantize_blockwise(w, bits, self.block_size, self.symmetric)
        return fake_quantize_8da4w(w, self.block_size, self.scales)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        if not self.activations:
            return x
        if self.scheme == "int4":
            return fake_quantize_int8_blocks(x, self.block_size)
        return fake_quantize_per_token_int8(x)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias=None,
               bits: int = 4) -> torch.Tensor:
        """x (..., in) @ ŵᵀ + bias with W (out, in), both fake-quantized: one exported MatMul."""
        return F.linear(self.activation(x), self.weight(weight, bits), bias)

    def quantizes(self, in_features: int) -> bool:
        """Whether the exporter quantizes a MatMul of this input width (8da4w leaves widths
        that are not a multiple of the group in float; MatMulNBits pads any width)."""
        return self.scheme == "int4" or in_features % self.block_size == 0


def _cached(module: nn.Module, key: tuple, compute) -> tuple[torch.Tensor, ...]:
    """`compute()`, the quantized weights of `module`, kept on it while gradients are off
    (evaluation: many windows, one quantization) and recomputed when `key` (the rank) or
    its parameters change (a training step bumps their version)."""
    if torch.is_grad_enabled():
        return compute()
    state = tuple((p.data_ptr(), p._version, p.dtype) for p in module.parameters(recurse=False))
    cached = module.__dict__.get("_qat_cache")
    if cached is not None and cached[0] == (key, state):
        return cached[1]
    value = compute()
    module.__dict__["_qat_cache"] = ((key, state), value)
    return value


def nested_forward(layer: NestedLinear, spec: QuantSpec, x: torch.Tensor) -> torch.Tensor:
    """`layer`'s output at its active rank as the quantized export computes it: the rank
    rounded as the exporter rounds it, each exported weight fake-quantized."""
    m, n = layer.out_features, layer.in_features
    r = layer.rank
    if spec.align_ranks:
        r = aligned_rank(r, layer.max_rank, spec.block_size)
    dense = deployed_form(m, n, r) == "dense"

    def weights():
        U, V = layer.U[:, :r], layer.V[:, :r]  # (m, r), (n, r)
        if dense:
            weight = U @ V.T  # (m, n)
            return (spec.weight(weight) if spec.quantizes(n) else weight,)
        return (spec.weight(V.T) if spec.quantizes(n) else V.T,
                spec.weight(U) if spec.quantizes(r) else U)

    quantized = _cached(layer, (r,), weights)
    x = spec.activation(x) if spec.quantizes(n) else x
    if dense:
        return F.linear(x, quantized[0], layer.bias)
    z = F.linear(x, quantized[0])  # (..., r)
    z = spec.activation(z) if spec.quantizes(r) else z
    return F.linear(z, quantized[1], layer.bias)


def linear_forward(layer: nn.Linear, spec: QuantSpec, bits: int,
                   x: torch.Tensor) -> torch.Tensor:
    """An `nn.Linear` as one exported MatMul."""
    (quantized,) = _cached(layer, (), lambda: (spec.weight(layer.weight, bits),))
    return F.linear(spec.activation(x), quantized, layer.bias)


def embedding_forward(layer: nn.Embedding, spec: QuantSpec, ids: torch.Tensor) -> torch.Tensor:
    """Rows of the table as the export stores it: int4, the tied lm_head's blocks
    (GatherBlockQuantized reads the same codes); 8da4w, weight-only rows or groups."""
    def table():
        if spec.scheme == "int4":
            return (spec.weight(layer.weight, spec.embedding_bits),)  # (vocab, hidden)
        return (fake_quantize_embedding_8da4w(layer.weight, spec.embedding_bits,
                                              spec.block_size),)

    (quantized,) = _cached(layer, (), table)
    return F.embedding(ids, quantized, layer.padding_idx, layer.max_norm, layer.norm_type,
                       layer.scale_grad_by_freq, layer.sparse)


def _tied_to_embedding(model: nn.Module) -> set[int]:
    """ids of weights shared with an embedding table (a tied lm_head)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def quantized_modules(model: nn.Module, spec: QuantSpec) -> dict[str, nn.Module]:
    """{name: module} of what the export of `spec` quantizes: every `NestedLinear`, and
    every plain `nn.Linear` it quantizes (an unfactorised GPT-2 `Conv1D` is left float
    here). int4: a Linear tied to the embedding table stays float with `embedding_bits`
    32 (its weight is a Transpose of the table, not a constant), else it and the
    embedding are quantized at `embedding_bits`. 8da4w: every Linear whose input width
    is a multiple of the group, the lm_head included, and the embeddings unless
    `embedding_bits` is 32 (exporters/executorch/quant.py). Convolutions stay float."""
    tables = _tied_to_embedding(model) if spec.scheme == "int4" else set()
    linears = {id(m.weight) for m in model.modules() if type(m) is nn.Linear}
    tied = tables & linears

    def quantized(module: nn.Module) -> bool:
        if isinstance(module, NestedLinear):
            return True
        if id(getattr(module, "weight", None)) in tied:
            return spec.embedding_bits != 32
        if isinstance(module, nn.Embedding) and spec.scheme == "8da4w":
            return spec.embedding_bits != 32
        return type(module) is nn.Linear and spec.quantizes(module.in_features)

    return {name: module for name, module in model.named_modules() if quantized(module)}


def fake_quantize_(model: nn.Module, spec: QuantSpec) -> dict[str, nn.Module]:
    """Make every module `quantized_modules` names compute as the quantized export does,
    in place (each instance's `forward` is replaced; `restore_` undoes it). Parameters are
    untouched: gradients reach them through the straight-through estimator. Returns the
    modules changed."""
    chosen = quantized_modules(model, spec)
    tied = _tied_to_embedding(model)
    for module in chosen.values():
        if isinstance(module, NestedLinear):
            module.forward = partial(nested_forward, module, spec)
        elif isinstance(module, nn.Embedding):
            module.forward = partial(embedding_forward, module, spec)
        else:
            bits = spec.embedding_bits if id(module.weight) in tied else 4
            module.forward = partial(linear_forward, module, spec, bits)
    return chosen


def restore_(modules: dict[str, nn.Module]) -> None:
    """Undo `fake_quantize_` on the modules it returned."""
    for module in modules.values():
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_qat_cache", None)


@contextlib.contextmanager
def fake_quantized(model: nn.Module, spec: QuantSpec | str) -> Iterator[nn.Module]:
    """Within the block, `model` computes as its quantized export (`fake_quantize_`);
    `spec` may be a scheme name ("int4", "8da4w") with the default block size."""
    spec = QuantSpec(spec) if isinstance(spec, str) else spec
    changed = fake_quantize_(model, spec)
    try:
        yield model
    finally:
        restore_(changed)


def quantized_copy(model: nn.Module, scheme: str = "int4", block_size: int = 32,
                   **options) -> nn.Module:
    """A deep copy of `model` computing as its `scheme` export (for evaluation); the
    caller's model is not modified. `options`: further `QuantSpec` fields."""
    copied = copy.deepcopy(model)
    fake_quantize_(copied, QuantSpec(scheme, block_size, **options))
    return copied


def qat_start_(model: nn.Module, config: DistillConfig) -> dict[str, nn.Module]:
    """Quantization-aware distillation's switch, in place: with `config.qat` set, `model`
    computes every budget as its `config.qat` export (`fake_quantize_`, block
    `config.qat_block_size`); returns the modules changed ({} without qat), for `restore_`."""
    if config.qat is None:
        return {}
    return fake_quantize_(model, QuantSpec(str(config.qat), config.qat_block_size))
