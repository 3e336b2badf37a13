"""Clean-up of an exported graph for onnxruntime: fewer nodes, same numbers.

Decoding one token of a small LM on a CPU is dominated by node dispatch, not arithmetic.
TorchScript export of a transformers decoder computes the target of every Reshape and
Expand from Shape → Gather → Unsqueeze → Concat chains over the live tensors: SmolLM2's
decoder graph has ~100 nodes per block around its 7 weight MatMuls, ~2.5 µs each on
onnxruntime's CPU provider, which was 40 % of a dense decode step and more of a factored
one. `simplify` removes them, in this order:

1. Static shapes, from onnxruntime's symbolic shape inference: a Reshape whose output shape
   can be written with constants, 0 (copy the input's dimension) and a single -1 gets that
   constant target; an Expand gets a constant target of 1s and the broadcast sizes; a
   Slice that returns its input unchanged (start 0, step 1, same shape) is dropped.
   Then common subexpressions are merged, equal constants included (the per-block
   conversion of the shared causal mask becomes one node), and nodes whose outputs
   nothing reads are removed with unread initializers. SmolLM2: 7,426 -> 2,532 nodes.
2. Transformers models: onnxruntime's fusions (`onnxruntime.transformers.optimizer`,
   whose pattern search is quadratic in the node count, hence after 1): RMSNorm with its
   residual add → SkipSimplifiedLayerNormalization, the rotary embedding →
   RotaryEmbedding. Its attention fusion stays off (its fused op has its own KV-cache
   layout); step 1 again on what the fusions leave. SmolLM2: 1,224 nodes.
3. Decoders: attention → GroupQueryAttention (`onnx_attention`), with Hugging Face's
   `past_key_values.*` / `present.*` kept, and the cached length read from the mask so
   that the cache can be updated in place; the op applies the rotary itself where it can
   (`do_rotary`; attention.py says how positions stay Hugging Face's). SmolLM2: 511 nodes
   with 60 RotaryEmbedding, 211 of them MatMul; 451 with the rotary inside.
4. Sibling MatMuls (`fuse_sibling_matmuls`, any graph): the MatMuls that read the same
   activation with their own constant weight (q/k/v, gate/up; with factors, their first
   stages) become one MatMul over the weights side by side and a Split. Decoding one token
   is a stream of weight reads, and onnxruntime reads a small weight matrix below the
   memory bandwidth it reaches on a large one (a fixed latency per MatMul): SmolLM2 dense
   211 -> 121 MatMuls, β = 0.5 421 -> 331; decode 0.986x and 0.976x (BENCHMARKS.md). Off
   for the shared and elastic layouts, whose graphs must read the nested factors as they
   are stored, and for int8 exports. A fused q/k/v projection then goes to
   GroupQueryAttention packed, without its Split (`onnx_attention.pack_qkv`): SmolLM2 int4
   β = 1 484 -> 394 nodes with step 3's rotary (BENCHMARKS.md, issue 15).

Every exported budget is still validated against PyTorch afterwards.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from flexrank.exporters.onnx.attention import fuse_attention, pack_qkv, past_length_from_mask
from flexrank.exporters.onnx.graph import (
    PROTOBUF_LIMIT,
    constant_values,
    outer_inputs,
    rename_inputs,
    subgraphs,
)

logger = logging.getLogger(__name__)

# Fusions that keep the graph's inputs and outputs as they are.
_FUSIONS_OFF = ("enable_attention", "enable_embed_layer_norm", "enable_qordered_matmul",
                "enable_gemm_fast_gelu", "enable_nhwc_conv", "enable_group_norm")


def simplify(model: onnx.ModelProto, num_heads: int = 0, hidden_size: int = 0,
             kv_heads: int = 0, fuse: bool = True, siblings: bool = True,
             rotary_inside: bool = True) -> onnx.ModelProto:
    """`model` simplified in place, and returned (use the returned graph: with `fuse` it
    may be another ModelProto).

    `num_heads` / `hidden_size` (0: detected) are passed to onnxruntime's fusions; with
    `num_heads` and `kv_heads` given, a decoder's attention becomes GroupQueryAttention
    (`onnx_attention.fuse_attention`, which applies the rotary itself with `rotary_inside`
    where it can); with `siblings`, MatMuls that read the same input become one
    (`fuse_sibling_matmuls`), and a fused q/k/v projection goes to GroupQueryAttention
    packed (`onnx_attention.pack_qkv`)."""
    before = len(model.graph.node)
    done = _clean(model)  # first: onnxruntime's fusions are quadratic in the node count
    if fuse and model.ByteSize() >= PROTOBUF_LIMIT:
        logger.warning("graph of %.1f GB: onnxruntime's fusions need it in one protobuf "
                       "(< 2 GB), skipped", model.ByteSize() / 1e9)
        fuse = False
    if fuse:
        fused = len(model.graph.node)
        model = ort_fusions(model, num_heads, hidden_size)
        done["fusions"] = fused - len(model.graph.node)
        done += _clean(model)  # the fused nodes' shape chains
        done["rotary positions per row"] = rotary_positions_per_row(model.graph)
        if kv_heads:
            done["attention blocks"] = fuse_attention(model, num_heads, kv_heads, rotary_inside)
            done["cache length from the mask"] = past_length_from_mask(model.graph)
            done["dead"] += remove_unused(model.graph)
    if siblings:
        done["sibling MatMuls"] = fuse_sibling_matmuls(model)
        done["packed QKV"] = pack_qkv(model.graph)
    logger.debug("graph simplified: %d -> %d nodes (%s)", before, len(model.graph.node),
                ", ".join(f"{k} {v}" for k, v in done.items()))
    return model


def rotary_positions_per_row(graph: onnx.GraphProto) -> int:
    """Give every fused RotaryEmbedding positions of shape (batch, sequence).

    The op takes position_ids of shape (B, S) (or a scalar offset), but a graph without a
    `position_ids` input (optimum's Gemma export, for one) computes positions once for all
    rows, (1, S) or (S,): fused as they are, the graph runs at batch 1 only ("position_ids
    dimension 0 should be of size batch_size"). Such positions are broadcast to the shape
    of `input_ids` with one Expand, shared by the nodes that read them. Returns the number
    of Expands added.
    """
    inputs = {i.name for i in graph.input}
    if "input_ids" not in inputs:
        return 0
    expanded: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        if node.op_type == "RotaryEmbedding" and node.domain == "com.microsoft" \
                and len(node.input) > 1 and node.input[1] not in inputs:
            source = node.input[1]
            if source not in expanded:
                shape, out = f"{source}/ids_shape", f"{source}/per_row"
                nodes.append(helper.make_node("Shape", ["input_ids"], [shape],
                                              name=f"{source}/IdsShape"))
                nodes.append(helper.make_node("Expand", [source, shape], [out],
                                              name=f"{source}/PerRow"))  # (B, S)
                expanded[source] = out
            node.input[1] = expanded[source]
        nodes.append(node)
    if expanded:
        del graph.node[:]
        graph.node.extend(nodes)  # each Expand sits right before its first reader
    return len(expanded)


def _clean(model: onnx.ModelProto) -> Counter:
    """Static shapes, merged subexpressions, dead nodes: how many of each."""
    done = Counter({f"static {op}": n for op, n in static_shapes(model).items()})
    done["merged"] = merge_common(model.graph)
    done["dead"] = remove_unused(model.graph)
    return done


def ort_fusions(model: onnx.ModelProto, num_heads: int, hidden_size: int) -> onnx.ModelProto:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("gpt2")
    for flag in _FUSIONS_OFF:
        setattr(options, flag, False)
    # its modules log every fusion at INFO under their bare module names
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        # opt_level 0: the Python fusions only; onnxruntime's own optimizer runs at load time
        optimized = optimize_model(model, model_type="gpt2", num_heads=num_heads,
                                   hidden_size=hidden_size, optimization_options=options,
                                   opt_level=0, use_gpu=False)
    finally:
        logging.disable(previous)
    fused = optimized.model
    domains = {node.domain for node in fused.graph.node} - {"", "ai.onnx"}
    imported = {opset.domain for opset in fused.opset_import}
    for domain in sorted(domains - imported):  # the fusions leave com.microsoft undeclared
        fused.opset_import.append(helper.make_opsetid(domain, 1))
    return fused


# --- static shapes -------------------------------------------------------------------------

Dim = int | str | None  # a size, a symbolic size, or unknown


def symbolic_shapes(model: onnx.ModelProto) -> dict[str, list[Dim]]:
    """{tensor name: dims} by onnxruntime's symbolic shape inference ({} if it fails)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as error:  # noqa: BLE001 - an unsupported op: keep the graph as it is
        logger.warning("symbolic shape inference failed (%s): shapes left dynamic", error)
        return {}
    if inferred is None:
        return {}
    graph = inferred.graph
    shapes = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        kind = info.type.WhichOneof("value")
        if kind != "tensor_type" or not info.type.tensor_type.HasField("shape"):
            continue
        shapes[info.name] = [d.dim_value if d.HasField("dim_value")
                             else (d.dim_param or None) for d in info.type.tensor_type.shape.dim]
    return shapes


def reshape_target(dims_in: list[Dim], dims_out: list[Dim]) -> list[int] | None:
    """A constant Reshape target giving `dims_out` from `dims_in`, or None."""
    target, inferred = [], 0
    for j, dim in enumerate(dims_out):
        if isinstance(dim, int) and dim > 0:
            target.append(dim)
        elif dim is not None and j < len(dims_in) and dims_in[j] == dim:
            target.append(0)
        else:
            target.append(-1)
            inferred += 1
    return target if inferred <= 1 else None


def expand_target(dims_in: list[Dim], dims_out: list[Dim]) -> list[int] | None:
    """A constant Expand target broadcasting `dims_in` to `dims_out`, or None."""
    offset = len(dims_out) - len(dims_in)
    if offset < 0:
        return None
    target = []
    for j, dim in enumerate(dims_out):
        source = dims_in[j - offset] if j >= offset else 1
        if dim is not None and source == dim:
            target.append(1)
        elif source == 1 and isinstance(dim, int) and dim > 0:
            target.append(dim)
        else:
            return None
    return target


def _known(dims: list[Dim] | None) -> bool:
    return dims is not None and all(d is not None for d in dims)


def _is_identity_slice(node, shapes, constants) -> bool:
    dims_in, dims_out = shapes.get(node.input[0]), shapes.get(node.output[0])
    if not (_known(dims_in) and dims_in == dims_out):
        return False
    starts = constants.get(node.input[1])
    if starts is None or np.any(starts != 0):
        return False
    if len(node.input) < 5 or not node.input[4]:
        return True  # steps default to 1
    steps = constants.get(node.input[4])
    return steps is not None and not np.any(steps != 1)


def static_shapes(model: onnx.ModelProto) -> Counter:
    """Constant Reshape/Expand targets and identity Slices dropped; returns counts."""
    graph = model.graph
    shapes = symbolic_shapes(model)
    if not shapes:
        return Counter()
    constants = constant_values(graph)
    outputs = {o.name for o in graph.output}
    done: Counter = Counter()
    new_inits, renames, dropped = [], {}, []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        dims_in, dims_out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if node.op_type == "Slice":
            if node.output[0] not in outputs and _is_identity_slice(node, shapes, constants):
                renames[node.output[0]] = node.input[0]
                dropped.append(node)
                done["Slice"] += 1
            continue
        if node.op_type not in ("Reshape", "Expand") or node.input[1] in constants:
            continue
        if not (_known(dims_in) and _known(dims_out)):
            continue
        if node.op_type == "Reshape":
            if any(a.name == "allowzero" and a.i for a in node.attribute):
                continue
            target = reshape_target(dims_in, dims_out)
        else:
            target = expand_target(dims_in, dims_out)
        if target is None:
            continue
        name = f"{node.output[0]}_static_shape"
        new_inits.append(numpy_helper.from_array(np.array(target, np.int64), name))
        node.input[1] = name
        done[node.op_type] += 1
    graph.initializer.extend(new_inits)
    for node in dropped:
        graph.node.remove(node)
    rename_inputs(graph, renames)
    return done


# --- common subexpressions and dead nodes ---------------------------------------------------

def _has_subgraph(node) -> bool:
    return bool(subgraphs(node))


def merge_common(graph: onnx.GraphProto) -> int:
    """Nodes with the same op, attributes and inputs as an earlier one read its outputs
    instead (deterministic ops only; graph outputs kept). Returns how many were merged."""
    outputs = {o.name for o in graph.output}
    seen, renames, dropped = {}, {}, []
    for node in graph.node:
        inputs = tuple(renames.get(name, name) for name in node.input)
        if (_has_subgraph(node) or node.op_type.startswith("Random")
                or any(o in outputs for o in node.output)):
            continue
        key = (node.domain, node.op_type, inputs, len(node.output),
               tuple(a.SerializeToString() for a in node.attribute))
        first = seen.setdefault(key, node)
        if first is not node:
            renames.update((o, f) for o, f in zip(node.output, first.output, strict=True) if o)
            dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    rename_inputs(graph, renames)
    return len(dropped)


def remove_unused(graph: onnx.GraphProto) -> int:
    """Drop nodes none of whose outputs is read, and unread initializers."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(outer_inputs(node))
    removed = len(graph.node) - len(keep)
    if removed:
        kept = list(reversed(keep))
        del graph.node[:]
        graph.node.extend(kept)
    unread = [init for init in graph.initializer if init.name not in needed]
    for init in unread:
        graph.initializer.remove(init)
    return removed


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)



# --- sibling MatMuls -----------------------------------------------------------------------

def _own_weight(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers that are a 2-D float weight read by exactly one node input, with their
    data in the graph (not external), by name."""
    reads = Counter(name for node in graph.node for name in outer_inputs(node))
    reads.update(o.name for o in graph.output)
    return {init.name: init for init in graph.initializer
            if len(init.dims) == 2 and reads[init.name] == 1
            and init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
            and init.data_location != onnx.TensorProto.EXTERNAL}


def _scope(names: list[str]) -> str:
    """The longest common `/`-scope of node names: /model/layers.0/self_attn/q_proj/MatMul
    and /model/layers.0/self_attn/k_proj/MatMul -> /model/layers.0/self_attn/"""
    parts = [name.split("/") for name in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common) + "/"


def fuse_sibling_matmuls(model: onnx.ModelProto) -> int:
    """MatMuls of the main graph that read the same input with their own constant 2-D
    weights (same dtype) become one MatMul over the weights concatenated along N, followed
    by a Split into the original outputs. Returns how many MatMuls were removed.

    Same numbers: each output column is the same dot product over the same K values.
    Weights read by another node too (a tied weight) are left alone, so no byte is stored
    twice. The fused node sits where the first sibling was: every sibling reads the same,
    already computed input, and every consumer came after its own sibling."""
    graph = model.graph
    weights = _own_weight(graph)
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if (node.op_type == "MatMul" and node.domain in ("", "ai.onnx")
                and node.input[1] in weights):
            groups.setdefault(node.input[0], []).append(node)
    groups = {a: nodes for a, nodes in groups.items()
              if len(nodes) > 1 and len({weights[n.input[1]].data_type for n in nodes}) == 1}
    if not groups:
        return 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    fused_at = {id(nodes[0]): nodes for nodes in groups.values()}
    absorbed = {id(n) for nodes in groups.values() for n in nodes[1:]}
    used = {n.name for n in graph.node}
    new_nodes, new_inits, removed = [], [], 0
    for node in graph.node:
        if id(node) in absorbed:
            continue
        if id(node) not in fused_at:
            new_nodes.append(node)
            continue
        nodes = fused_at[id(node)]
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        base = _scope([n.name for n in nodes]) + "SiblingMatMul"
        name, k = base, 0
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        new_inits.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), name + "/weight"))
        sizes = [a.shape[1] for a in arrays]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], name + "/weight"],
                                          [name + "/output"], name=name))
        outputs = [n.output[0] for n in nodes]
        if opset >= 13:
            new_inits.append(numpy_helper.from_array(np.array(sizes, np.int64), name + "/split"))
            split = helper.make_node("Split", [name + "/output", name + "/split"], outputs,
                                     name=name + "/Split", axis=-1)
        else:
            split = helper.make_node("Split", [name + "/output"], outputs,
                                     name=name + "/Split", axis=-1, split=sizes)
        new_nodes.append(split)
        removed += len(nodes) - 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    remove_unused(graph)
    return removed
