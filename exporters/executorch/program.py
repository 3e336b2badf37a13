"""From a deployed PyTorch module to an ExecuTorch `.pte` program lowered to XNNPACK.

    torch.export  ->  to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])
                  ->  to_executorch  ->  model.pte

- decoder LMs: transformers' `TorchExportableModuleForDecoderOnlyLM` (static KV cache
  held as mutable buffers inside the program), forward(input_ids (1, T), cache_position
  (T,)) -> logits (1, T, V), T dynamic up to the maximum sequence length; metadata as
  constant methods (`get_max_seq_len`, `get_vocab_size`, `get_bos_id`, `get_eos_ids`,
  `get_n_layers`, ... as ExecuTorch's LLM runner reads them, plus the FlexRank budget and
  ranks);
- encoders (transformers, no generation) and generic modules: dynamic batch and
  sequence/spatial axes where `torch.export` can keep them (`Dim.AUTO`), else static.

Delegate blobs and constant tensors are written as segments after the flatbuffer
(`extract_delegate_segments`; constants always go to the constant segment), so the
flatbuffer the runtime parses stays small and large files load.

Tied tables (`weights_file=True`): a decoder whose embedding and lm_head share one float
table would hold it twice in a single `.pte`, because the embedding lookup is a portable
op whose table is a program constant while the lm_head is an XNNPACK linear whose weight
the delegate stores in its own named data (XNNPACK has no gather; ExecuTorch 1.5's
runtime resolves program constants from an external data map only, never from the
`.pte`'s own named data: runtime/executor/method.cpp). ExecuTorch's own LLM export does
the same (examples/models/smollm2/convert_weights.py copies the table into
`output.weight`; its `--use_shared_embedding` needs torchao's kernels, not XNNPACK). So
every constant, the delegate's included (`delegate_constant_tag`), goes to one
`model.ptd` beside the program, whose named-data store keeps each distinct buffer once
(content SHA-256, exir/_serialize/_named_data_store.py). Tiny Llama with a tied 4096 × 64
table: one `.pte` 1.82× the unique weight bytes; `.pte` + `.ptd` 1.05×. Both runtimes take
the file: `Runtime.load_program(pte, data_path=ptd)`, `TextLLMRunner(pte, tokenizer,
data_path)`.
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from flexrank.io import atomic_path

logger = logging.getLogger(__name__)

REASON_CHARS = 400  # the first characters of torch.export's message kept in our error


class ExecutorchTraceError(ValueError):
    """`torch.export` could not trace the model: names the module and the reason."""


# ---- metadata ---------------------------------------------------------------------------

def decoder_metadata(model: nn.Module, max_seq_len: int, custom_ops: bool = False) -> dict:
    """The constant methods ExecuTorch's LLM runner (and optimum-executorch) read;
    `custom_ops`: the program's attention and KV cache are ExecuTorch's LLM ops."""
    config = model.config.get_text_config()
    eos = getattr(model.generation_config, "eos_token_id", None) or config.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])
               if e is not None]
    bos = getattr(config, "bos_token_id", None)
    return {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "get_max_batch_size": 1,
        "get_vocab_size": int(config.vocab_size),
        "get_bos_id": -1 if bos is None else int(bos),
        "get_eos_ids": eos_ids,
        "get_n_layers": int(config.num_hidden_layers),
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": bool(custom_ops),
        "enable_dynamic_shape": True,
    }


def flexrank_metadata(beta: float, ranks: dict[str, int], quantize: str | None) -> dict:
    """Budget and plan ranks; ranks as a list in layer order plus a JSON {layer: rank}."""
    return {
        "get_flexrank_budget": float(beta),
        "get_flexrank_ranks": [int(r) for r in ranks.values()],
        "get_flexrank_ranks_json": json.dumps(ranks),
        "get_flexrank_quantize": quantize or "none",
    }


# ---- tracing ----------------------------------------------------------------------------

class _EncoderOutputs(nn.Module):
    """A transformers encoder as a module of named tensor inputs -> tuple of tensors."""

    def __init__(self, model: nn.Module, output_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.output_names = output_names

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs)
        return tuple(out[name] for name in self.output_names)


def decoder_wrapper(deployed: nn.Module, max_seq_len: int) -> nn.Module:
    """transformers' static-cache wrapper around the deployed decoder (modified in place:
    `deployed` is already the exporter's own copy)."""
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    deployed.generation_config.use_cache = True
    deployed.generation_config.cache_implementation = "static"
    deployed.config.use_cache = True
    return TorchExportableModuleForDecoderOnlyLM(deployed, batch_size=1,
                                                 max_cache_len=max_seq_len).eval()


CUSTOM_SDPA = "flexrank_llama_custom_sdpa"  # our name in transformers' AttentionInterface


def _custom_sdpa_attention(module, query, key, value, attention_mask, scaling=None,
                           dropout=0.0, **kwargs):
    """transformers attention function over ExecuTorch's `llama::custom_sdpa`: `query`
    (B, H, T, D); `key`/`value` the whole KV cache as `_LLMCache.update` returns it,
    (B, max_seq_len, H_kv, D); causal from `flexrank_start_pos` (grouped-query heads are
    the op's). Returns ((B, T, H, D), None) as transformers' sdpa_attention_forward.
    Raises NotImplementedError for what the op does not compute (a sliding window, logit
    soft-capping, attention sinks), so that the exporter falls back to the static cache."""
    unsupported = [name for name in ("sliding_window", "softcap", "s_aux")
                   if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(f"llama::custom_sdpa has no {', '.join(unsupported)}")
    output = torch.ops.llama.custom_sdpa(query.transpose(1, 2), key, value,
                                         kwargs["flexrank_start_pos"], None, 0, True, scaling)
    return output, None


class _LLMCache:
    """A transformers cache (duck-typed) over the wrapper's buffers, written in place by
    ExecuTorch's `llama::update_cache` at `start_pos`: what ExecuTorch's own LLM export
    does (examples/models/llama/source_transformation/custom_kv_cache.py), so the program
    has no index_put and no mask, and attention reads positions [0, start_pos + T) only."""

    is_compileable = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], start_pos):
        self.keys, self.values, self.start_pos = keys, values, start_pos

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        torch.ops.llama.update_cache(key_states.transpose(1, 2), self.keys[layer_idx],
                                     self.start_pos)
        torch.ops.llama.update_cache(value_states.transpose(1, 2), self.values[layer_idx],
                                     self.start_pos)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # unused: the wrapper passes cache_position


class LLMCustomOpsDecoder(nn.Module):
    """forward(input_ids (1, T), cache_position (T,)) -> logits (1, T, V) of a
    transformers decoder, its KV cache held as buffers (1, max_seq_len, H_kv, D) per
    layer and written by `llama::update_cache`, attention by `llama::custom_sdpa`: the
    ops `export_llama --use_sdpa_with_kv_cache` puts in ExecuTorch's own programs, whose
    kernels ExecuTorch's runtime and LLM runner ship (executorch.extension.llm.custom_ops).
    Run or trace it inside `with wrapper.custom_attention():`, which switches the model's
    config to the `CUSTOM_SDPA` attention (no mask is built) and back afterwards, so the
    model itself still runs as before outside (the exporter's eager references)."""

    def __init__(self, model: nn.Module, max_seq_len: int):
        super().__init__()
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (the ops)
        from transformers import AttentionInterface

        AttentionInterface.register(CUSTOM_SDPA, _custom_sdpa_attention)
        config = model.config.get_text_config()
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        dtype = next(model.parameters()).dtype
        self.model, self.max_seq_len = model, max_seq_len
        self.layers = int(config.num_hidden_layers)
        for i in range(self.layers):
            for kind in ("k", "v"):
                self.register_buffer(f"{kind}_cache_{i}",
                                     torch.zeros(1, max_seq_len, kv_heads, head_dim,
                                                 dtype=dtype), persistent=False)

    @contextmanager
    def custom_attention(self):
        configs = {id(c): c for c in (self.model.config, self.model.config.get_text_config())}
        for module in self.model.modules():  # blocks with a config of their own (stand-ins)
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                configs[id(config)] = config
        before = {key: c._attn_implementation for key, c in configs.items()}
        try:
            for c in configs.values():
                c._attn_implementation = CUSTOM_SDPA
            yield self
        finally:
            for key, c in configs.items():
                c._attn_implementation = before[key]

    @torch.no_grad()
    def mismatch(self, input_ids: torch.Tensor, rtol: float = 1e-3) -> str | None:
        """None when this wrapper, run eagerly on `input_ids` (1, T) prefilled in two
        chunks and then one decode step, gives the model's own logits (to `rtol` of
        their largest magnitude); else why not. Every layer's attention must take the
        cache through transformers' attention functions: a module with attention of its
        own reads the cache in another layout. The cache buffers are zeroed afterwards."""
        ids = input_ids[:, :self.max_seq_len - 1]
        length = ids.shape[1]
        # a prefill of two chunks, then one decode step: start positions 0, > 0 and T - 1
        cuts = sorted({0, *(c for c in (length // 2, length - 1) if 0 < c < length), length})
        try:
            expected = self.model(input_ids=ids, use_cache=False).logits
            with self.custom_attention():
                got = torch.cat([self(ids[:, a:b], torch.arange(a, b))
                                 for a, b in zip(cuts, cuts[1:], strict=False)], 1)
        except Exception as err:  # noqa: BLE001 - any failure means: not this path
            return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        finally:
            for buffer in self.buffers():
                buffer.zero_()
        worst = float((got - expected).abs().max())
        scale = float(expected.abs().max())
        if not worst <= rtol * max(scale, 1.0):
            return f"eager logits differ by {worst:.3g} (largest {scale:.3g})"
        return None

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        start = cache_position[0].item()
        torch._check_is_size(start)
        torch._check(start + input_ids.shape[1] <= self.max_seq_len)
        cache = _LLMCache([getattr(self, f"k_cache_{i}") for i in range(self.layers)],
                          [getattr(self, f"v_cache_{i}") for i in range(self.layers)], start)
        return self.model(input_ids=input_ids, cache_position=cache_position,
                          position_ids=cache_position[None], past_key_values=cache,
                          use_cache=True, flexrank_start_pos=start).logits


def encoder_wrapper(deployed: nn.Module, sample: dict) -> nn.Module:
    with torch.no_grad():
        out = deployed(**sample)
    names = tuple(k for k, v in out.items() if isinstance(v, torch.Tensor))
    return _EncoderOutputs(deployed, names).eval()


# Dynamic axes tried in order for encoders and generic modules: XNNPACK refuses some
# graphs with several dynamic axes (a reshape with more than one), so fall back.
DYNAMIC_CHOICES = ("batch+sequence", "batch", "static")


def _dims(tensor: torch.Tensor, choice: str, max_batch: int, max_len: int) -> dict:
    """Dim.AUTO on the batch axis and (for "batch+sequence") every axis after the
    channel/feature axis, or the sequence axis of 2-D integer ids; torch.export keeps an
    axis dynamic when it can."""
    auto = torch.export.Dim.AUTO
    if choice == "static":
        return {}
    axes = {0: auto(min=1, max=max_batch)}
    if choice == "batch":
        return axes
    extra = range(1, tensor.dim()) if tensor.dim() == 2 and not tensor.is_floating_point() \
        else range(2, tensor.dim())
    for axis in extra:
        axes[axis] = auto(min=1, max=max(max_len, tensor.shape[axis]))
    return axes


def trace(module: nn.Module, kind: str, sample, max_seq_len: int, max_batch: int,
          dynamic: str = "batch+sequence"):
    """torch.export `module` (a decoder wrapper, or an encoder wrapper / generic module
    called with the positional tuple `sample`)."""
    try:
        if kind == "decoder":
            # transformers' static cache exports with strict (dynamo) tracing only; the
            # non-strict path fails in run_decompositions with torch 2.13.
            seq = torch.export.Dim("seq", min=1, max=max_seq_len - 1)
            kwargs = {"input_ids": sample, "cache_position": torch.arange(sample.shape[1])}
            return torch.export.export(module, (), kwargs, strict=True, dynamic_shapes={
                "input_ids": {1: seq}, "cache_position": {0: seq}})
        shapes = tuple(_dims(a, dynamic, max_batch, max_seq_len) for a in sample)
        return torch.export.export(module, sample, dynamic_shapes=shapes, strict=False)
    except Exception as err:  # noqa: BLE001 - any tracing failure becomes one clear error
        raise ExecutorchTraceError(trace_failure_message(module, err)) from err


def trace_and_lower(module: nn.Module, kind: str, sample, max_seq_len: int, max_batch: int,
                    path: Path, metadata: dict, quantized: bool = False,
                    weights_file: bool = False):
    """Trace and lower to `path` with the most dynamic axes XNNPACK accepts; returns the
    ExportedProgram. `weights_file`: see `lower_to_pte`."""
    choices = ("decoder",) if kind == "decoder" else DYNAMIC_CHOICES
    for i, choice in enumerate(choices):
        last = i == len(choices) - 1
        try:
            program = trace(module, kind, sample, max_seq_len, max_batch, choice)
            lower_to_pte(program, path, metadata, quantized, weights_file)
            return program
        except Exception as err:  # noqa: BLE001 - retried with fewer dynamic axes
            if last:
                raise
            logger.info("dynamic axes %r refused (%s: %s); trying %r", choice,
                        type(err).__name__, str(err).split("\n", 1)[0][:200], choices[i + 1])
    raise AssertionError("unreachable")


def _user_frame(err: BaseException, module: nn.Module) -> tuple[str, str, str] | None:
    """(module name, class, 'file:line') of the innermost frame inside one of `module`'s
    submodules: from the Python traceback (non-strict export runs the model's code), else
    from dynamo's 'from user code' lines (strict export)."""
    by_id = {id(m): name for name, m in module.named_modules()}
    found = None
    chain, seen = err, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        for frame, line in traceback.walk_tb(chain.__traceback__):
            owner = frame.f_locals.get("self")
            if id(owner) in by_id:
                found = (by_id[id(owner)] or "<root>", type(owner).__name__,
                         f"{frame.f_code.co_filename}:{line}")
        chain = chain.__cause__ or chain.__context__
    if found is not None:
        return found
    places = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', str(err))
    for filename, line, function in reversed(places):
        for name, m in module.named_modules():
            code = getattr(getattr(type(m), function, None), "__code__", None)
            if code is not None and code.co_filename == filename:
                return name or "<root>", type(m).__name__, f"{filename}:{line}"
    return None


def trace_failure_message(module: nn.Module, err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    reason = (lines[0] if lines else type(err).__name__)[:REASON_CHARS]
    where = _user_frame(err, module)
    place = (f"module {where[0]!r} ({where[1]}, {where[2]})" if where
             else f"the model ({type(module).__name__})")
    return (f"torch.export cannot trace {place}: {type(err).__name__}: {reason}. ExecuTorch "
            "needs a graph without data-dependent Python control flow; rewrite that code with "
            "tensor ops (torch.where, torch.cond) or export a module without it")


# ---- lowering ---------------------------------------------------------------------------

def weights_path(path: Path) -> Path:
    """The data file `lower_to_pte(..., weights_file=True)` writes beside `path`."""
    return Path(path).with_suffix(".ptd")


def _tag_delegate_constants(program, tag: str) -> None:
    """Mark every parameter and lifted constant of `program` so that the XNNPACK delegate
    stores it in the external data file `tag` (node_visitor.get_serialized_buffer_index
    reads meta["custom"]["delegate_constant_tag"])."""
    signature = program.graph_signature
    constants = set(signature.inputs_to_parameters) | set(
        signature.inputs_to_lifted_tensor_constants)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in constants:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag


def lower_to_pte(program, path: Path, metadata: dict, quantized: bool = False,
                 weights_file: bool = False) -> Path:
    """XNNPACK lowering and serialisation of an ExportedProgram to `path`; `quantized`:
    fuse torchao's dequantize + embedding into ExecuTorch's quantized embedding ops
    (`do_quant_fusion_and_const_prop`, as ExecuTorch's own model exports do);
    `weights_file`: every constant in `weights_path(path)`, each distinct buffer once
    (module docstring: tied tables)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    tag = weights_path(path).stem
    if weights_file:
        _tag_delegate_constants(program, tag)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                       constant_methods=metadata)
    executorch_program = edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True,  # delegate blobs as segments, not in the flatbuffer
        do_quant_fusion_and_const_prop=quantized,
        external_constants=(lambda _node: tag) if weights_file else False))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        executorch_program.write_to_file(f)  # streams the segments; no full copy in memory
    if weights_file:
        executorch_program.write_tensor_data_to_file(str(path.parent))  # <tag>.ptd
        if not weights_path(path).is_file():
            raise RuntimeError(f"ExecuTorch wrote no {weights_path(path).name} beside {path}; "
                               "export without weights_file")
    return path


def dynamic_axes(program) -> dict[str, list[int]]:
    """{user input name: axes that stayed dynamic} of an ExportedProgram."""
    user_inputs = set(program.graph_signature.user_inputs)
    out = {}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                out[node.name] = [i for i, s in enumerate(value.shape)
                                  if not isinstance(s, int)]
    return out


def segment_layout(path: Path) -> dict:
    """Sizes of the flatbuffer and of the segments after it (ExecuTorch extended header),
    and of the weights file beside it when there is one (`data_file`, `data_bytes`)."""
    from executorch.exir._serialize._program import _ExtendedHeader

    with open(path, "rb") as f:
        head = f.read(64)
    header = _ExtendedHeader.from_bytes(head[8:])
    size = path.stat().st_size
    data = weights_path(path)
    extra = ({"data_file": data.name, "data_bytes": data.stat().st_size} if data.is_file()
             else {})
    if not header.is_valid():
        return {"bytes": size, "flatbuffer_bytes": size, "segment_bytes": 0, **extra}
    return {"bytes": size, "flatbuffer_bytes": int(header.program_size),
            "segment_bytes": size - int(header.segment_base_offset), **extra}


def runner_readable_tokenizer_(folder: Path) -> list[str]:
    """Make `folder`'s tokenizer.json load in ExecuTorch's LLM runner (`TextLLMRunner`,
    whose C++ Hugging Face tokenizer comes from pytorch/tokenizers), in place; returns what
    changed, empty when nothing did.

    Why: SmolLM2's tokenizer (rebuilt by transformers from its GGUF file) has an empty
    normalizer `{"type": "Sequence", "normalizers": []}`, which that loader refuses ("Failed
    to setup normalizer: Missing normalizers for Normalizer of type Sequence"), so the
    runner could not load the bundle at all. A Sequence of no steps normalizes nothing,
    the same as no normalizer (`null`), which the loader takes; Hugging Face's tokenizer
    encodes alike either way. Nothing else is touched."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    normalizer = data.get("normalizer")
    if not (isinstance(normalizer, dict) and normalizer.get("type") == "Sequence"
            and not normalizer.get("normalizers")):
        return []
    data["normalizer"] = None
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return ["tokenizer.json: empty normalizer Sequence -> null"]
