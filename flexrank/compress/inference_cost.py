"""The work of one forward pass of one input (encoders, ViTs, CNNs), counted with forward
hooks on the modules that do it, at the model's active ranks.

An LM's cost is per token (`budget_cost`); a vision model's is per image, and a conv's
multiply-adds scale with its output's spatial size H_out·W_out, which no per-token figure
holds. So one real forward of a sample input is run with a hook on every module, and each
counts what its kernel does (MACs = multiply-adds; FLOPs = 2 × MACs):

- `nn.Linear` (and transformers' `Conv1D`), m×n: rows·m·n MACs, m·n weights read;
- `NestedLinear` at rank r: two matmuls, rows·(m+n)·r MACs and (m+n)·r weights, or the
  dense rows·m·n where (m+n)·r is above `DENSE_ABOVE`·m·n (at and near full rank the
  exporter deploys one dense matmul: `exporters.common.gauge.choose_form`);
- `nn.Conv1d/2d`: N·C_out·S_out·(C_in/groups)·k MACs (S_out = output positions, H_out·W_out
  for 2-d; k = kernel positions); `NestedConv*` at rank r: its rank-r conv, N·r·S_out·C_in·k,
  then its 1×1 conv, N·C_out·S_out·r (or the dense conv under the same rule as linears);
- attention (a module with `num_attention_heads` and `attention_head_size`, as BERT's and
  ViT's self-attention, `num_heads` and `head_dim`, or `n_heads` and `dim`): QKᵀ and AV,
  2·B·heads·T²·head_dim MACs for T tokens (its q, k, v projections are linears, counted
  as such);
- `nn.Embedding`: the rows looked up (one per input id), read as activations.

Bytes (counted here as elements; `InferenceWork.bytes` prices them): the weights each
module reads, and the activations the matmul, conv and attention kernels read and write
(their inputs and outputs, a factorised layer's rank-r intermediate, and the attention
scores, written by QKᵀ and read by AV). Elementwise layers (norms, activations, batch norm)
are not counted as work, only their parameters as read: onnxruntime folds batch norm and
ReLU into a dense conv before them (FusedConv) and merges residual adds into its
SkipLayerNormalization and bias into BiasGelu, but these still run. Measured on a
ViT-Tiny shape in onnxruntime, one thread, they are about 40 % of the time, and they do not
shrink with the rank (BENCHMARKS.md, "Latency per inference of vision models"): the
roofline over the counted work overstates a small budget's speed-up. torch's
FlopCounterMode is not used: it misses CPU sdpa attention and counts the nested layers'
`.weight` property (U_r V_rᵀ) as work.

Known limits: `nn.MultiheadAttention` runs its projections functionally and is counted as
self-attention from its own shapes; other functional matmuls outside modules are not seen.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from flexrank.compress.layers import NestedLinear, _NestedConv, is_transposed_conv1d

# Above this fraction of the dense m·n multiply-adds the exporter deploys a factorised layer
# as one dense matmul (exporters.common.gauge.DENSE_FRACTION; test_predict_vision checks
# that the two agree; compress cannot import the exporters).
DENSE_ABOVE = 0.9
ACTIVATION_BYTES = 4  # activations stay float32 in every export
_SKIPPED = (nn.Dropout, nn.Identity)  # no work in inference (exports drop them)


@dataclass
class InferenceWork:
    """Counts of one forward pass (numbers, not bytes); `per_module` has each module's
    MACs by qualified name (attention under its own name, "<name>:attention")."""

    macs: int = 0  # multiply-adds of matmuls, convolutions and attention
    attention_macs: int = 0  # the part in QKᵀ and AV: quadratic in the tokens
    matmul_weights: int = 0  # linear/conv weight elements read (what quantization shrinks)
    other_weights: int = 0  # other parameters read: biases, norms, position tables, tokens
    activations: int = 0  # elements the kernels read and write (attention scores included)
    attention_activations: int = 0  # the part in the attention scores: quadratic in tokens
    per_module: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def weight_bytes(self, matmul_bits: float = 32) -> float:
        """Weights read, bytes: linear/conv weights at `matmul_bits` per element (after
        quantization), the rest float32."""
        return self.matmul_weights * matmul_bits / 8 + self.other_weights * 4

    def bytes(self, matmul_bits: float = 32) -> float:
        """Weights read plus activations read and written (float32), bytes."""
        return self.weight_bytes(matmul_bits) + self.activations * ACTIVATION_BYTES


def factor_macs(m: int, n: int, rank: int) -> int:
    """Multiply-adds per row of a rank-`rank` m×n factorised layer as deployed: the two
    matmuls (m+n)·r, or the dense m·n when those exceed `DENSE_ABOVE`·m·n."""
    plain = (m + n) * rank
    return m * n if plain > DENSE_ABOVE * m * n else plain


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    """A module's main input: its first positional argument, else the keyword the encoders
    pass it by (hidden_states; DistilBERT's attention: query), else the first tensor."""
    if args and torch.is_tensor(args[0]):
        return args[0]
    for name in ("hidden_states", "query", "x", "input"):
        if torch.is_tensor(kwargs.get(name)):
            return kwargs[name]
    return next((v for v in kwargs.values() if torch.is_tensor(v)), None)


def _attention_heads(module: nn.Module) -> tuple[int, int] | None:
    """(heads, head dim) of a self-attention module by the attributes transformers' encoders
    give it (BERT, RoBERTa, ViT, DeiT, Swin, DeBERTa: num_attention_heads and
    attention_head_size; CLIP, Whisper: num_heads and head_dim; DistilBERT: n_heads and the
    width dim), None for other modules."""
    for heads, dim, per_head in (("num_attention_heads", "attention_head_size", True),
                                 ("num_heads", "head_dim", True), ("n_heads", "dim", False)):
        h, d = getattr(module, heads, None), getattr(module, dim, None)
        if isinstance(h, int) and isinstance(d, int) and h > 0 and d > 0:
            return h, d if per_head else d // h
    return None


def _attention_modules(model: nn.Module) -> set[int]:
    """ids of the innermost modules `_attention_heads` recognises (a wrapper that carries
    the same attributes as the attention inside it is not counted twice)."""
    found = {id(m) for m in model.modules() if _attention_heads(m) is not None}
    return {id(m) for m in model.modules() if id(m) in found
            and not any(id(c) in found for c in m.modules() if c is not m)}


class _Counter:
    """The hooks' shared state: one `InferenceWork`, filled as the forward runs."""

    def __init__(self, attention: set[int]):
        self.work = InferenceWork()
        self.attention = attention  # ids of the modules whose QKᵀ and AV are counted

    def add(self, name: str, macs: int = 0, matmul_weights: int = 0, other_weights: int = 0,
            activations: int = 0) -> None:
        w = self.work
        w.macs += macs
        w.matmul_weights += matmul_weights
        w.other_weights += other_weights
        w.activations += activations
        w.per_module[name] += macs

    def hook(self, name: str, module: nn.Module):
        def count(mod, args, kwargs, output):
            x = _first_tensor(args, kwargs)
            y = output[0] if isinstance(output, tuple) else output
            y = y if torch.is_tensor(y) else None
            self.count_module(name, mod, x, y)
        return count

    def count_module(self, name: str, mod: nn.Module, x, y) -> None:
        if isinstance(mod, NestedLinear):
            self._nested_linear(name, mod, x)
        elif isinstance(mod, _NestedConv):
            self._nested_conv(name, mod, x, y)
        elif isinstance(mod, nn.Linear) or is_transposed_conv1d(mod):
            m, n = (mod.out_features, mod.in_features) if isinstance(mod, nn.Linear) \
                else (mod.nf, mod.weight.shape[0])
            rows = x.numel() // n
            self.add(name, rows * m * n, m * n, _bias(mod), rows * (m + n))
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            per_output = mod.weight[0].numel()  # (C_in / groups) · kernel positions
            self.add(name, y.numel() * per_output, mod.weight.numel(), _bias(mod),
                     x.numel() + y.numel())
        elif isinstance(mod, nn.Embedding):
            self.add(name, activations=y.numel())  # the rows looked up
        elif isinstance(mod, nn.MultiheadAttention):
            self._multihead(name, mod, x)
        else:
            self.add(name, other_weights=sum(p.numel() for p in mod.parameters(recurse=False)))
            if id(mod) in self.attention and x is not None and x.dim() == 3:
                self._attention(f"{name}:attention", x.shape[0], x.shape[1],
                                *_attention_heads(mod))

    def _nested_linear(self, name: str, mod: NestedLinear, x) -> None:
        m, n, r = mod.out_features, mod.in_features, mod.rank
        rows = x.numel() // n
        per_row = factor_macs(m, n, r)
        between = 0 if per_row == m * n else 2 * rows * r  # z written, then read
        self.add(name, rows * per_row, per_row, _bias(mod), rows * (m + n) + between)

    def _nested_conv(self, name: str, mod: _NestedConv, x, y) -> None:
        m, r = mod.out_channels, mod.rank
        n = mod.V.shape[0]  # C_in · kernel positions
        positions = y.numel() // m  # N · S_out
        per_position = factor_macs(m, n, r)
        between = 0 if per_position == m * n else 2 * positions * r
        self.add(name, positions * per_position, per_position, _bias(mod),
                 x.numel() + y.numel() + between)

    def _attention(self, name: str, batch: int, tokens: int, heads: int, dim: int) -> None:
        macs = 2 * batch * heads * tokens * tokens * dim  # QKᵀ and AV
        scores = 2 * batch * heads * tokens * tokens  # written by QKᵀ, read by AV
        self.add(name, macs, activations=4 * batch * tokens * heads * dim + scores)
        self.work.attention_macs += macs
        self.work.attention_activations += scores

    def _multihead(self, name: str, mod: nn.MultiheadAttention, x) -> None:
        tokens, batch = (x.shape[1], x.shape[0]) if mod.batch_first else x.shape[:2]
        e = mod.embed_dim
        rows = batch * tokens
        weights = sum(p.numel() for p in mod.parameters() if p.dim() == 2)
        self.add(name, rows * 4 * e * e, weights,
                 sum(p.numel() for p in mod.parameters() if p.dim() < 2),
                 rows * 2 * 4 * e)  # in and out of the four projections
        self._attention(f"{name}:attention", batch, tokens, mod.num_heads, e // mod.num_heads)


def _bias(mod: nn.Module) -> int:
    bias = getattr(mod, "bias", None)
    return bias.numel() if torch.is_tensor(bias) else 0


def _leaves_of_counted(model: nn.Module) -> set[int]:
    """ids of modules inside a counted kernel module (nn.MultiheadAttention's out_proj is
    called functionally by it; a nested layer has no children): not hooked."""
    inside = set()
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            inside.update(id(m) for m in module.modules() if m is not module)
    return inside


@torch.no_grad()
def count_work(model: nn.Module, inputs) -> InferenceWork:
    """The work of `model(**inputs)` (a dict) or `model(inputs)` (a tensor or a tuple), at
    the model's current ranks, counted by forward hooks (module docstring). One input per
    call: pass a batch of one to price one inference (counts scale with the batch).

    The hooks are removed afterwards, also when the forward raises."""
    counter = _Counter(_attention_modules(model))
    inside = _leaves_of_counted(model)
    handles = []
    try:
        for name, module in model.named_modules():
            if isinstance(module, _SKIPPED) or id(module) in inside:
                continue
            handles.append(module.register_forward_hook(counter.hook(name or "<model>", module),
                                                        with_kwargs=True))
        if isinstance(inputs, dict):
            model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            model(*inputs)
        else:
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    counter.work.per_module = dict(counter.work.per_module)
    return counter.work


DEFAULT_IMAGE_SIZE = 224  # ImageNet's (exporters.common.sample uses the same default)
DEFAULT_TOKENS = 128  # a sentence for an encoder; predictions rescale to a profile's count


def sample_input(model: nn.Module, tokens: int = DEFAULT_TOKENS) -> tuple[dict, str, int]:
    """(inputs of one inference, a description, its token count or 0 for pixels) for a
    transformers model: `pixel_values` (1, num_channels, H, W) at config.image_size (224
    when the config names none) for a vision model, else `input_ids` of `tokens` ids with
    an all-ones attention mask (and zero token_type_ids when the forward takes them),
    capped at the model's positions.

    Raises ValueError for a model without a transformers config (pass inputs to
    `count_work` yourself)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no transformers config: its input "
                         "cannot be guessed; call count_work(model, inputs) with one input")
    if getattr(model, "main_input_name", None) == "pixel_values":
        size = getattr(config, "image_size", None) or DEFAULT_IMAGE_SIZE
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        pixels = torch.zeros(1, config.num_channels, height, width)
        return {"pixel_values": pixels}, f"pixel_values (1, {config.num_channels}, {height}, " \
                                         f"{width})", 0
    limit = getattr(config, "max_position_embeddings", None)
    tokens = min(tokens, limit) if isinstance(limit, int) and limit > 0 else tokens
    ids = torch.ones(1, tokens, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in model.forward.__code__.co_varnames:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs, f"{tokens} token ids", tokens



def inference_fields(elastic, beta: float, matmul_bits: float = 32,
                     tokens: int = DEFAULT_TOKENS) -> dict:
    """The `BudgetCost.inference_*` fields of budget `beta` of an `ElasticModel`: the work
    of one `sample_input` (an image at the config's size, or `tokens` token ids) counted at
    that budget's ranks, linear/conv weights priced at `matmul_bits` per element. Empty for
    a model without a transformers config (its input is not known). The elastic model's
    ranks are put back as they were."""
    model = elastic.model
    if getattr(model, "config", None) is None:
        return {}
    inputs, described, counted_tokens = sample_input(model, tokens)
    before = elastic.budget
    ranks = {name: layer.rank for name, layer in elastic.layers.items()}
    try:
        elastic.set_budget(beta)
        work = count_work(model, inputs)
    finally:
        if before is not None:
            elastic.set_budget(before)
        else:
            for name, rank in ranks.items():
                elastic.layers[name].rank = rank
            elastic.budget = None
    return {"inference_flops": float(work.flops),
            "inference_attention_flops": float(2 * work.attention_macs),
            "inference_bytes": work.bytes(matmul_bits),
            "inference_weight_bytes": work.weight_bytes(matmul_bits),
            "inference_attention_bytes": float(work.attention_activations * ACTIVATION_BYTES),
            "inference_tokens": counted_tokens, "inference_input": described}
