"""Decoder attention as one onnxruntime `GroupQueryAttention` node per block.

After `onnx_simplify`'s fusions a Llama-family block still spends ~25 nodes between its
q/k/v projections and o_proj: head split (Reshape, Transpose) ×3, the KV-cache Concats,
repeat_kv (Unsqueeze, Expand, Reshape) ×2, the scaled QKᵀ, the mask Add, Softmax, its NaN
guard, PV, and the head merge. `fuse_attention` replaces them with

    GroupQueryAttention(q, k, v, past_key_values.i.*, seqlens_k, total_sequence_length,
                        cos_cache, sin_cache, attention_bias = the exported mask,
                        do_rotary=1)  -> o_proj input, present.i.*

(q, k, v: the (B, S, heads·D) projections, or one packed (B, S, (H + 2·H_kv)·D) tensor),
or, where the op cannot rotate itself, RotaryEmbedding(q), RotaryEmbedding(k) before it.

Every row is declared full length (seqlens_k = total - 1) and the exported causal+padding
mask goes in as `attention_bias`, its -inf clamped to float32's lowest so that no score row
is all -inf (the unfused graph guards those rows, left-padding queries, against NaN after
its Softmax). The cache tensors keep their names and BNSH layout, so optimum's
ORTModelForCausalLM runs the graph.

Rotary. Where the op can rotate itself (head size a multiple of 16, full rotary, the
tables initializers: `_rotary_tables`), it does (`do_rotary`, cos_cache/sin_cache = the
RotaryEmbedding's tables), as onnxruntime-genai's builder does, and where q, k and v are
then one Split of one projection (`fuse_sibling_matmuls` at β = 1) they go in packed
(`pack_qkv`): 3 nodes fewer per block (two RotaryEmbedding, one Split). The op's rotary
does not take Hugging Face's positions in every phase: its `position_ids` input is honoured
per row on a cached step, but on a first prompt (sequence = total length) the kernel reads
position_ids[0, 0] only, as an offset for every row (onnxruntime 1.32, measured:
tests/test_gqa_rotary.py). So, like the builder, the fused graph leaves position_ids
unread and the op rotates each token by its index in the sequence (past + s). For a row
whose tokens are contiguous (no padding, or left padding as batched generation pads)
Hugging Face's positions are that index minus the row's padding p, and attention scores
depend on position differences only, so every logit is Hugging Face's, prompt and cached
steps alike; the cached keys of a left-padded row are Hugging Face's rotated by p (values
and unpadded rows' keys are equal). Not exact: a cache written by another runtime for a
padded row, and masks with holes inside a row. `fuse_attention(..., rotary_inside=False)`
(`simplify(rotary_inside=False)`) keeps the RotaryEmbedding nodes on position_ids, exact
in those cases too; so does a block the op cannot rotate (SmolLM2's 64-wide heads can).

Each block is matched structurally from its `present.<i>.key` / `.value` Concats; a block
whose subgraph differs from the expected shape is left as it is.

The exported graph reads the cached length from a cache tensor's shape to build positions
and the causal mask; `past_length_from_mask` reads it from the inputs instead (mask length
minus new tokens, equal under Hugging Face's cache convention). Then, when every block is
fused, the cache inputs are read by GroupQueryAttention alone (`kv_cache_in_place`) and a
runtime may bind past_key_values.i.* and present.i.* to one preallocated buffer that the
op updates in place (`exporters/validate.CacheDecoder`) instead of copying the whole cache
into `present` on every token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flexrank.exporters.onnx.graph import (
    constant_values,
    outer_inputs,
    rename_inputs,
    subgraphs,
    topological_sort,
)

logger = logging.getLogger(__name__)

_CHAIN_TO_SCORES = ("Unsqueeze", "Expand", "Reshape", "Transpose", "Mul")
FLOAT32_LOWEST = float(np.finfo(np.float32).min)
# GroupQueryAttention's own rotary (do_rotary) takes head sizes that are multiples of this
GQA_ROTARY_HEAD_MULTIPLE = 16


class _Graph:
    """Producer/consumer lookups over a graph's nodes."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.constants = constant_values(graph)

    def op(self, name: str, op_type: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 else None

    def head_split_source(self, name: str) -> str | None:
        """x for name = Transpose(Reshape(x), perm 0,2,1,3), i.e. (B, S, H·D) -> (B, H, S, D)."""
        transpose = self.op(name, "Transpose")
        if transpose is None or _perm(transpose) != [0, 2, 1, 3]:
            return None
        reshape = self.op(transpose.input[0], "Reshape")
        return None if reshape is None else reshape.input[0]

    def scalar(self, name: str) -> float | None:
        value = self.constants.get(name)
        return None if value is None or value.size != 1 else float(value.reshape(()))


def _perm(node) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


@dataclass
class _Block:
    index: int
    q: str  # (B, S, H·D) projections
    k: str
    v: str
    rotary: onnx.NodeProto  # the graph's rotary node on k (attributes, cos/sin, positions)
    bias: str  # additive mask (B, 1, S, T)
    scale: float
    out: str  # attention output (B, S, H·D), o_proj's input
    removed: list  # the cache Concats and the head-merge Reshape, replaced by the fused node


def _match(g: _Graph, index: int) -> _Block | None:
    """Block `index`'s attention when its subgraph has the expected shape, else None:

        present.key -> [repeat_kv, Kᵀ, scale] -> MatMul(Q, ·) -> Add(mask) -> Softmax
        -> [NaN guard] -> MatMul(·, V) <- [repeat_kv] <- present.value; -> merge heads
    """
    concats = _cache_concats(g, index)
    if concats is None:
        return None
    concat_k, concat_v = concats
    rotary_k = g.op(concat_k.input[1], "RotaryEmbedding")
    k = None if rotary_k is None else g.head_split_source(rotary_k.input[0])
    v = g.head_split_source(concat_v.input[1])
    if k is None or v is None:
        return None
    key_path = _scores_from_key(g, concat_k)
    if key_path is None:
        return None
    scores, key_scale = key_path
    query = _query_source(g, scores.input[0], rotary_k)
    if query is None:
        return None
    q, query_scale = query
    softmax_path = _softmax_to_mix(g, scores)
    if softmax_path is None:
        return None
    add, mix = softmax_path
    if _repeat_kv_source(g, mix.input[1]) != concat_v.output[0]:
        return None
    merge = _head_merge(g, mix)
    if merge is None:
        return None
    return _Block(index, q, k, v, rotary_k, add.input[1], key_scale * query_scale,
                  merge.output[0], [concat_k, concat_v, merge])


def _cache_concats(g: _Graph, index: int) -> tuple | None:
    """(Concat(past key, new key), Concat(past value, new value)) producing present.index.*."""
    concat_k = g.producer.get(f"present.{index}.key")
    concat_v = g.producer.get(f"present.{index}.value")
    if concat_k is None or concat_v is None or {concat_k.op_type, concat_v.op_type} != {"Concat"}:
        return None
    if list(concat_k.input)[:1] != [f"past_key_values.{index}.key"] or \
            list(concat_v.input)[:1] != [f"past_key_values.{index}.value"]:
        return None
    return concat_k, concat_v


def _scores_from_key(g: _Graph, concat_k) -> tuple | None:
    """(the QKᵀ MatMul, the product of the scale factors on the way) reached from
    present.key through repeat_kv, the Kᵀ Transpose and scalar Muls, each node the only
    reader of the one before."""
    scale, node, name = 1.0, None, concat_k.output[0]
    for _ in range(len(_CHAIN_TO_SCORES) + 1):
        users = [n for n in g.consumers.get(name, []) if n is not concat_k]
        if len(users) != 1:
            return None
        node = users[0]
        if node.op_type == "MatMul":
            break
        if node.op_type not in _CHAIN_TO_SCORES:
            return None
        perm = _perm(node)
        if node.op_type == "Transpose" and perm[-2:] != [len(perm) - 1, len(perm) - 2]:
            return None  # only Kᵀ (the last two axes swapped) belongs on this path
        if node.op_type == "Mul":
            factor = g.scalar(node.input[1])
            if factor is None:
                return None
            scale *= factor
        name = node.output[0]
    if node is None or node.op_type != "MatMul" or node.input[1] != name:
        return None
    return node, scale


def _query_source(g: _Graph, q_side: str, rotary_k) -> tuple[str, float] | None:
    """(q, the scale factor on it) for the scores' left input = [Mul(scalar)](Rotary(heads(q))),
    the rotary taking the same cos/sin/positions as the key's and no partial rotation."""
    scale = 1.0
    q_mul = g.op(q_side, "Mul")
    if q_mul is not None:
        factor = g.scalar(q_mul.input[1])
        if factor is None:
            return None
        scale = factor
        q_side = q_mul.input[0]
    rotary_q = g.op(q_side, "RotaryEmbedding")
    q = None if rotary_q is None else g.head_split_source(rotary_q.input[0])
    if q is None or list(rotary_q.input[1:]) != list(rotary_k.input[1:]):
        return None
    if {a.name for a in rotary_k.attribute} - {"interleaved", "scale"}:
        return None  # partial rotary (rotary_embedding_dim): not rewritten
    return q, scale


def _softmax_to_mix(g: _Graph, scores) -> tuple | None:
    """(Add(scores, mask), MatMul(probabilities, V)) for scores -> Add -> Softmax(last axis)
    -> [IsNaN/Where guard] -> MatMul, each the only reader of the one before."""
    add = g.only_consumer(scores.output[0])
    if add is None or add.op_type != "Add" or add.input[0] != scores.output[0]:
        return None
    softmax = g.only_consumer(add.output[0])
    if softmax is None or softmax.op_type != "Softmax" or \
            next((a.i for a in softmax.attribute if a.name == "axis"), -1) not in (-1, 3):
        return None
    probs = softmax.output[0]
    guard = next((n for n in g.consumers.get(probs, []) if n.op_type == "Where"), None)
    if guard is not None:
        probs = guard.output[0]
    mix = g.only_consumer(probs)
    if mix is None or mix.op_type != "MatMul" or mix.input[0] != probs:
        return None
    return add, mix


def _repeat_kv_source(g: _Graph, name: str) -> str:
    """The tensor that repeat_kv (Unsqueeze, Expand, Reshape) expands into `name`."""
    for _ in range(3):
        node = g.producer.get(name)
        if node is None or node.op_type not in ("Unsqueeze", "Expand", "Reshape"):
            break
        name = node.input[0]
    return name


def _head_merge(g: _Graph, mix):
    """The Reshape of Transpose(mix, 0,2,1,3): (B, H, S, D) -> (B, S, H·D), or None."""
    merge_t = g.only_consumer(mix.output[0])
    if merge_t is None or merge_t.op_type != "Transpose" or _perm(merge_t) != [0, 2, 1, 3]:
        return None
    merge = g.only_consumer(merge_t.output[0])
    return merge if merge is not None and merge.op_type == "Reshape" else None


def _sequence_inputs(graph: onnx.GraphProto) -> tuple[list, str, str]:
    """Nodes computing seqlens_k (B,) = total - 1 and total_sequence_length (scalar), both
    int32, from attention_mask's shape."""
    p = "/flexrank/gqa/"
    inits = [numpy_helper.from_array(np.array(1, np.int64), p + "one"),
             numpy_helper.from_array(np.array([0], np.int64), p + "batch_axis")]
    graph.initializer.extend(inits)
    nodes = [
        helper.make_node("Shape", ["attention_mask"], [p + "mask_shape"], name=p + "Shape"),
        helper.make_node("Gather", [p + "mask_shape", p + "one"], [p + "total"], axis=0,
                         name=p + "Gather_total"),
        helper.make_node("Gather", [p + "mask_shape", p + "batch_axis"], [p + "batch"], axis=0,
                         name=p + "Gather_batch"),
        helper.make_node("Cast", [p + "total"], [p + "total_i32"], to=TensorProto.INT32,
                         name=p + "Cast_total"),
        helper.make_node("Sub", [p + "total", p + "one"], [p + "last"], name=p + "Sub"),
        helper.make_node("Expand", [p + "last", p + "batch"], [p + "seqlens"], name=p + "Expand"),
        helper.make_node("Cast", [p + "seqlens"], [p + "seqlens_i32"], to=TensorProto.INT32,
                         name=p + "Cast_seqlens"),
    ]
    return nodes, p + "seqlens_i32", p + "total_i32"


def _rotary_tables(graph: onnx.GraphProto, rotary) -> tuple[str, str, int] | None:
    """(cos_cache, sin_cache, rotary_interleaved) when GroupQueryAttention can apply the
    graph's rotary node `rotary` itself (`do_rotary`), else None.

    Its kernel rotates the whole head (full rotary: the match refuses partial rotary) with
    tables of shape (rows, head_size / 2) and needs head_size to be a multiple of 16
    (onnxruntime's `CheckRotaryCaches`); the tables must be initializers of that shape and
    the node's `scale` 1."""
    attributes = {a.name: helper.get_attribute_value(a) for a in rotary.attribute}
    if float(attributes.get("scale", 1.0)) != 1.0 or len(rotary.input) != 4:
        return None
    dims = {init.name: list(init.dims) for init in graph.initializer}
    cos, sin = rotary.input[2], rotary.input[3]
    if cos not in dims or dims[cos] != dims.get(sin) or len(dims[cos]) != 2:
        return None
    if (2 * dims[cos][1]) % GQA_ROTARY_HEAD_MULTIPLE:
        return None
    return cos, sin, int(attributes.get("interleaved", 0))


def fuse_attention(model: onnx.ModelProto, num_heads: int, kv_heads: int,
                   rotary_inside: bool = True) -> int:
    """Replace each matched block's attention (see module doc); returns how many.

    With `rotary_inside`, a block whose rotary GroupQueryAttention can apply
    (`_rotary_tables`) gets `do_rotary` and no RotaryEmbedding node of its own."""
    graph = model.graph
    if "attention_mask" not in {i.name for i in graph.input} or num_heads <= 0:
        return 0
    g = _Graph(graph)
    blocks = []
    index = 0
    while f"present.{index}.key" in g.producer:
        block = _match(g, index)
        if block is not None:
            blocks.append(block)
        index += 1
    if not blocks:
        return 0
    if len(blocks) < index:
        logger.info("attention fused in %d of %d blocks", len(blocks), index)
    new_nodes, seqlens, total = _sequence_inputs(graph)
    finite = {}
    for block in blocks:
        if block.bias not in finite:
            name = f"{block.bias}/finite"
            lowest = f"{name}_lowest"
            graph.initializer.append(numpy_helper.from_array(np.array(FLOAT32_LOWEST, np.float32),
                                                             lowest))
            new_nodes.append(helper.make_node("Max", [block.bias, lowest], [name],
                                              name=f"{name}/Max"))
            finite[block.bias] = name
        p = f"/model/layers.{block.index}/self_attn/gqa/"
        i = block.index
        inside = _rotary_tables(graph, block.rotary) if rotary_inside else None
        if inside is not None:
            cos, sin, interleaved = inside
            new_nodes.append(helper.make_node(
                "GroupQueryAttention",
                [block.q, block.k, block.v, f"past_key_values.{i}.key",
                 f"past_key_values.{i}.value", seqlens, total, cos, sin, "", finite[block.bias]],
                [block.out, f"present.{i}.key", f"present.{i}.value"],
                name=p + "GroupQueryAttention", domain="com.microsoft",
                num_heads=num_heads, kv_num_heads=kv_heads, scale=block.scale,
                do_rotary=1, rotary_interleaved=interleaved))
            for node in block.removed:
                graph.node.remove(node)
            continue
        rotated = []
        for which, source in (("q", block.q), ("k", block.k)):
            rotary = helper.make_node("RotaryEmbedding", [source, *block.rotary.input[1:]],
                                      [p + f"rotary_{which}"], name=p + f"Rotary_{which}",
                                      domain="com.microsoft")
            rotary.attribute.extend(a for a in block.rotary.attribute
                                    if a.name in ("interleaved", "scale"))
            new_nodes.append(rotary)
            rotated.append(rotary.output[0])
        new_nodes.append(helper.make_node(
            "GroupQueryAttention",
            [rotated[0], rotated[1], block.v, f"past_key_values.{i}.key",
             f"past_key_values.{i}.value", seqlens, total, "", "", "", finite[block.bias]],
            [block.out, f"present.{i}.key", f"present.{i}.value"],
            name=p + "GroupQueryAttention", domain="com.microsoft",
            num_heads=num_heads, kv_num_heads=kv_heads, scale=block.scale))
        for node in block.removed:
            graph.node.remove(node)
    graph.node.extend(new_nodes)
    topological_sort(graph)
    if "com.microsoft" not in {o.domain for o in model.opset_import}:
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(blocks)


def _split_sizes(g: _Graph, split) -> list[int] | None:
    """The sizes of a Split on the last axis of a (B, S, N) tensor, or None."""
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    if axis not in (-1, 2):
        return None
    sizes = next((list(a.ints) for a in split.attribute if a.name == "split"), None)
    if sizes is None and len(split.input) > 1 and split.input[1]:
        values = g.constants.get(split.input[1])
        sizes = None if values is None else [int(v) for v in values.reshape(-1)]
    return sizes


def pack_qkv(graph: onnx.GraphProto) -> int:
    """GroupQueryAttention nodes with their own rotary (`do_rotary`) whose query, key and
    value are outputs 0, 1, 2 of one Split of a (B, S, (H + 2·H_kv)·D) projection (q, k and
    v fused by `fuse_sibling_matmuls`), read by nothing else, take that projection as packed
    QKV (key and value empty) and the Split goes: one node fewer per block, as
    onnxruntime-genai's builder does. Same numbers: the op splits the packed tensor into
    [q | k | v] at H·D and H_kv·D, the Split's sizes (checked). Returns how many."""
    g = _Graph(graph)
    outputs = {o.name for o in graph.output}
    splits = []
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or len(node.input) < 3:
            continue
        attributes = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        if attributes.get("do_rotary") != 1:
            continue  # rotary nodes between the Split and the op: nothing to pack
        split = g.op(node.input[0], "Split")
        if split is None or list(split.output) != list(node.input[:3]) or any(
                len(g.consumers.get(name, [])) != 1 or name in outputs for name in split.output):
            continue
        sizes = _split_sizes(g, split)
        heads, kv_heads = attributes.get("num_heads", 0), attributes.get("kv_num_heads", 0)
        if sizes is None or len(sizes) != 3 or not heads or not kv_heads or sizes[0] % heads:
            continue
        if sizes[0] // heads * kv_heads != sizes[1] or sizes[1] != sizes[2]:
            continue
        node.input[0], node.input[1], node.input[2] = split.input[0], "", ""
        splits.append(split)
    for split in splits:
        graph.node.remove(split)
    return len(splits)


CACHE_INPUT = "past_key_values."


def past_length_from_mask(graph: onnx.GraphProto) -> int:
    """Every Gather(Shape(past_key_values.*), 2) (the cached length, a scalar) computed
    instead as attention_mask's length minus input_ids': the same number whenever the cache
    holds exactly the past tokens, and still right when it is a larger buffer. Returns how
    many reads were rewritten."""
    names = {i.name for i in graph.input}
    if not {"attention_mask", "input_ids"} <= names:
        return 0
    shapes = {n.output[0] for n in graph.node if n.op_type == "Shape"
              and n.input[0].startswith(CACHE_INPUT) and not n.attribute}
    constants = constant_values(graph)
    reads = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in shapes
             and all(a.i == 0 for a in n.attribute if a.name == "axis")
             and n.input[1] in constants and constants[n.input[1]].shape == ()
             and int(constants[n.input[1]]) == 2]
    if not reads:
        return 0
    p = "/flexrank/cache/"
    graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), p + "seq_axis"))
    graph.node.extend([
        helper.make_node("Shape", ["attention_mask"], [p + "mask_shape"], name=p + "Shape_mask"),
        helper.make_node("Gather", [p + "mask_shape", p + "seq_axis"], [p + "total"], axis=0,
                         name=p + "Gather_total"),
        helper.make_node("Shape", ["input_ids"], [p + "ids_shape"], name=p + "Shape_ids"),
        helper.make_node("Gather", [p + "ids_shape", p + "seq_axis"], [p + "new"], axis=0,
                         name=p + "Gather_new"),
        helper.make_node("Sub", [p + "total", p + "new"], [p + "past_length"], name=p + "Sub"),
    ])
    rename_inputs(graph, {n.output[0]: p + "past_length" for n in reads})
    topological_sort(graph)
    return len(reads)


def kv_cache_in_place(graph: onnx.GraphProto) -> bool:
    """True when the graph has cache inputs and each is read only by GroupQueryAttention as
    its past key or value: then present.i.* may live in past_key_values.i.*'s buffer."""
    cache = [i.name for i in graph.input if i.name.startswith(CACHE_INPUT)]
    if not cache:
        return False
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {name: [] for name in cache}
    for node in graph.node:
        if subgraphs(node) and any(name in readers for name in outer_inputs(node)):
            return False  # read inside an If/Loop body
        for position, name in enumerate(node.input):
            if name in readers:
                readers[name].append((node, position))
    return all(found and all(node.op_type == "GroupQueryAttention" and position in (3, 4)
                             for node, position in found)
               for found in readers.values())
