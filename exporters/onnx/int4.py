"""Block-wise 4-bit weights in an exported ONNX graph (issue 15), through onnxruntime's own
`MatMulNBitsQuantizer`:

- every MatMul with a constant 2-D weight B (K, N) becomes `com.microsoft.MatMulNBits`:
  codes packed two per byte (N, ⌈K/b⌉, b/2), a scale per block of b weights along K, zero
  points unless symmetric; it computes A · ((code − zero) · scale);
- algorithms: "rtn" (round to nearest), "hqq" (Half-Quadratic Quantization, float zero
  points), "gptq" (GPTQ on calibration activations; the library's neural-compressor port,
  which re-quantizes GPTQ's result with RTN's symmetric grid: measured on the tiny test
  Llama, relative output error 0.12 against RTN's 0.083 and HQQ's 0.074),
  or "auto": each MatMul takes the one of them whose output error on calibration
  activations is smallest (`relative_output_error`);
- a tied embedding / lm_head is stored once, in 4 or 8 bits: the lm_head becomes a
  MatMulNBits over the table's transpose, and the embedding a `GatherBlockQuantized` that
  reads the same packed codes, scales and zero points (what onnxruntime-genai's builder
  does for tied embeddings: builders/base.py `make_embedding_lookup`, "lm_head weight ->
  Reshape -> GatherBlockQuantized [-> Slice]").

References: onnxruntime's ContribOperators.md (MatMulNBits, GatherBlockQuantized);
GPTQ: Frantar et al., 2022; HQQ: Badri & Shaji, 2023.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from flexrank.exporters.onnx.graph import load_model, outer_inputs

logger = logging.getLogger(__name__)

# bits of the tied embedding/lm_head table: 4 or 8 in blocks (GatherBlockQuantized), or 32
# (float, read by a Gather and a Transpose, as exported)
EMBEDDING_BITS = (4, 8, 32)
# GPTQ's own column block (its lazy-batch width), not the scale block: the library's default
GPTQ_COLUMNS = 128
# Rows of calibration activations kept per MatMul input to measure output errors.
ERROR_ROWS = 512
_QUANTIZER_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"


def _quantizer_module():
    """onnxruntime's matmul_nbits_quantizer, imported without the root-logger handler its
    import installs (`logging.basicConfig(level=INFO)` at module level, which would print
    every library's INFO lines on the terminal)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    return matmul_nbits_quantizer


@contextlib.contextmanager
def _quiet_quantizer():
    """The quantizer's per-node INFO lines and GPTQ's stdout progress bar kept off the
    terminal while it runs."""
    quantizer_log = logging.getLogger(_QUANTIZER_LOGGER)
    level = quantizer_log.level
    quantizer_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # HQQ hands torch a read-only view of the weight, which it only reads
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            yield
    finally:
        quantizer_log.setLevel(level)


@dataclass(frozen=True)
class TiedHead:
    """The lm_head MatMul and the embedding Gather that read one float table."""

    output: str  # the lm_head MatMul's output (kept by the MatMulNBits replacing it)
    gather: str  # the embedding Gather's output
    table: str  # the (vocab, hidden) float initializer
    weight: str  # its (hidden, vocab) transpose, the lm_head's constant weight


def untie_head_(model: onnx.ModelProto) -> TiedHead | None:
    """Give a tied lm_head (MatMul over Transpose(table), the table also read by one
    Gather) a constant weight, the table's transpose, so that the quantizer can quantize
    it; in place. None when the graph has no such pair (an untied head is a MatMul over its
    own constant weight and is quantized like any other)."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    transposes = {n.output[0]: n for n in graph.node
                  if n.op_type == "Transpose" and n.input[0] in inits}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in transposes:
            continue
        transpose = transposes[node.input[1]]
        table = transpose.input[0]
        gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == table]
        axis = [a.i for g in gathers for a in g.attribute if a.name == "axis"]
        if len(gathers) != 1 or any(axis) or len(inits[table].dims) != 2:
            continue
        weight = f"{table}.lm_head"
        array = numpy_helper.to_array(inits[table])
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T), weight))
        node.input[1] = weight
        if not any(transpose.output[0] in n.input for n in graph.node):
            graph.node.remove(transpose)
        return TiedHead(node.output[0], gathers[0].output[0], table, weight)
    return None


def gather_from_head_(model: onnx.ModelProto, head: TiedHead) -> dict:
    """Replace the embedding Gather of `head` by a `GatherBlockQuantized` over the packed
    codes, scales and zero points of the MatMulNBits that replaced the lm_head, and drop
    the float table; in place. Rows are padded to whole blocks in MatMulNBits (K = hidden
    rounded up), so a Slice cuts the padding off when hidden is not a multiple of the
    block. Returns {"bits", "block_size", "node"}.

    Raises ValueError when the lm_head was not quantized (no MatMulNBits writes its output)
    or carries float zero points (HQQ), which GatherBlockQuantized cannot read."""
    graph = model.graph
    head_node = next((n for n in graph.node
                      if n.op_type == "MatMulNBits" and n.output[0] == head.output), None)
    if head_node is None:
        raise ValueError(f"the tied lm_head writing {head.output!r} was not quantized")
    attrs = {a.name: a.i for a in head_node.attribute}
    hidden, vocab, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    blocks = -(-hidden // block)
    inits = {init.name: init for init in graph.initializer}
    zero_points = head_node.input[3] if len(head_node.input) > 3 else ""
    if zero_points and inits[zero_points].data_type != onnx.TensorProto.UINT8:
        raise ValueError("the tied lm_head has float zero points (HQQ); GatherBlockQuantized "
                         "reads uint8 ones: quantize the table with RTN")
    gather_at = next(i for i, n in enumerate(graph.node) if n.output and n.output[0] == head.gather)
    ids = graph.node[gather_at].input[1]
    prefix = "/model/embed_tokens/GatherBlockQuantized"
    shapes = {"codes": [vocab, blocks * block * bits // 8], "scales": [vocab, blocks],
              "zero_points": [vocab, -1]}
    nodes, inputs = [], []
    for role, name in (("codes", head_node.input[1]), ("scales", head_node.input[2]),
                       ("zero_points", zero_points)):
        if not name:
            continue
        shape = numpy_helper.from_array(np.asarray(shapes[role], np.int64),
                                        f"{prefix}/{role}_shape")
        graph.initializer.append(shape)
        nodes.append(helper.make_node("Reshape", [name, shape.name], [f"{prefix}/{role}"],
                                      name=f"{prefix}/Reshape_{role}"))
        inputs.append(f"{prefix}/{role}")
    inputs.insert(1, ids)
    padded = blocks * block != hidden
    gathered = f"{prefix}/output_0" if padded else head.gather
    nodes.append(helper.make_node("GatherBlockQuantized", inputs, [gathered], name=prefix,
                                  domain="com.microsoft", bits=bits, block_size=block,
                                  gather_axis=0, quantize_axis=1))
    if padded:
        bounds = [numpy_helper.from_array(np.asarray([v], np.int64), f"{prefix}/slice_{k}")
                  for k, v in (("start", 0), ("end", hidden), ("axis", -1))]
        graph.initializer.extend(bounds)
        nodes.append(helper.make_node("Slice", [gathered, *(b.name for b in bounds)],
                                      [head.gather], name=f"{prefix}/Slice"))
    del graph.node[gather_at]
    for offset, node in enumerate(nodes):
        graph.node.insert(gather_at + offset, node)
    if not any(head.table in n.input for n in graph.node):
        graph.initializer.remove(inits[head.table])
    return {"bits": bits, "block_size": block, "node": prefix}


def _algorithm_config(algorithm: str, block: int, bits: int, symmetric: bool, feeds):
    q = _quantizer_module()
    if algorithm == "hqq":
        return q.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    if algorithm == "gptq":
        if not feeds:
            raise ValueError("GPTQ needs calibration inputs; none were given")
        # any iterable of feed dicts: the library deep-copies it and iterates it
        return q.GPTQWeightOnlyQuantConfig(calibration_data_reader=list(feeds),
                                           block_size=GPTQ_COLUMNS)
    return q.DefaultWeightOnlyQuantConfig(block_size=block, bits=bits, is_symmetric=symmetric)


def quantized_graph(model: onnx.ModelProto, algorithm: str, block: int, bits: int = 4,
                    symmetric: bool = True, exclude=(), feeds=None) -> onnx.ModelProto:
    """`model` (left unchanged) with its constant-weight MatMuls (but `exclude`, node
    names; GPTQ ignores it) quantized by `algorithm` ("rtn", "hqq", "gptq"; `feeds`:
    calibration input dicts for GPTQ)."""
    q = _quantizer_module()
    work = copy.deepcopy(model)
    unread = _unread_inputs(work)
    if unread and algorithm == "gptq":
        # GPTQ's calibration pass (the library's neural-compressor port) looks up every graph
        # input's consumers and fails on one that has none: position_ids once
        # GroupQueryAttention rotates by itself (attention.py). Hidden from it, put back after.
        names = {i.name for i in unread}
        kept = [i for i in work.graph.input if i.name not in names]
        del work.graph.input[:]
        work.graph.input.extend(kept)
        feeds = [{k: v for k, v in feed.items() if k not in names} for feed in feeds or ()]
    config = _algorithm_config(algorithm, block, bits, symmetric, feeds)
    quantizer = q.MatMulNBitsQuantizer(work, bits=bits, block_size=block,
                                       is_symmetric=symmetric, nodes_to_exclude=list(exclude),
                                       algo_config=config)
    with _quiet_quantizer():
        quantizer.process()
    result = quantizer.model.model
    if unread and algorithm == "gptq":
        order = [i.name for i in model.graph.input]
        present = {i.name: i for i in result.graph.input}
        present.update({i.name: i for i in unread})
        del result.graph.input[:]
        result.graph.input.extend(present[name] for name in order)
    return result


def _unread_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that no node reads, subgraphs included (copies)."""
    from flexrank.exporters.onnx.graph import outer_inputs

    read = {name for node in model.graph.node for name in outer_inputs(node)}
    return [copy.deepcopy(i) for i in model.graph.input if i.name not in read]


def dequantized(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> np.ndarray:
    """The float64 (K, N) weight a MatMulNBits `node` multiplies by: (code − zero) · scale
    per block along K (ContribOperators.md, MatMulNBits; codes packed low nibble first;
    zero points uint8-packed like the codes, float (HQQ), or 2^(bits−1) when absent)."""
    attrs = {a.name: a.i for a in node.attribute}
    k, n, block, bits = attrs["K"], attrs["N"], attrs["block_size"], attrs.get("bits", 4)
    blocks = -(-k // block)
    packed = inits[node.input[1]].reshape(n, -1)
    if bits == 4:  # two codes a byte, low nibble first
        packed = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)
    codes = packed.reshape(n, blocks, block).astype(np.float64)
    scales = inits[node.input[2]].astype(np.float64).reshape(n, blocks)
    zero = np.full((n, blocks), 2.0 ** (bits - 1))
    if len(node.input) > 3 and node.input[3]:
        stored = inits[node.input[3]]
        if stored.dtype == np.uint8 and bits == 4:
            stored = np.stack([stored & 0x0F, stored >> 4], axis=-1).reshape(n, -1)[:, :blocks]
        zero = stored.astype(np.float64).reshape(n, blocks)
    weight = (codes - zero[..., None]) * scales[..., None]  # (N, blocks, block)
    return weight.reshape(n, -1)[:, :k].T


def relative_output_error(x: np.ndarray, weight: np.ndarray, approx: np.ndarray) -> float:
    """‖x (Ŵ − W)‖_F / ‖x W‖_F for activations x (rows, K) and weights (K, N): the
    relative error a quantized weight adds to a MatMul's output on those activations."""
    x = x.astype(np.float64)
    reference = np.linalg.norm(x @ weight)
    return float(np.linalg.norm(x @ (approx - weight)) / max(reference, 1e-30))


def weight_matmuls(model: onnx.ModelProto) -> dict[str, tuple[str, str]]:
    """{output: (activation input, weight initializer)} of the MatMuls with a constant
    2-D weight (what the quantizer quantizes), keyed by output, which quantization keeps."""
    inits = {i.name: i for i in model.graph.initializer}
    return {n.output[0]: (n.input[0], n.input[1]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2}


def matmul_activations(model: onnx.ModelProto, names: list[str], feeds, threads: int = 2,
                       rows: int = ERROR_ROWS) -> dict[str, np.ndarray]:
    """{tensor: (≤ rows, width)} the values of `names` (MatMul inputs) on the calibration
    `feeds`, run in onnxruntime with those tensors added as graph outputs; rows taken
    evenly from all positions."""
    import onnxruntime as ort

    probe = copy.deepcopy(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # no fusions: a probed tensor must stay a tensor of the graph
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    found: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            found[name].append(value.reshape(-1, value.shape[-1]))
    out = {}
    for name, parts in found.items():
        stacked = np.concatenate(parts)
        step = max(1, len(stacked) // rows)
        out[name] = stacked[::step][:rows]
    return out


def choose_algorithms_(model: onnx.ModelProto, candidates: dict[str, onnx.ModelProto],
                       feeds, threads: int = 2) -> dict[str, dict]:
    """Per MatMul of the float `model`, the candidate graph ({algorithm: quantized copy})
    whose MatMulNBits has the smallest `relative_output_error` on the calibration
    activations; `model` becomes the float graph with each MatMul swapped for its chosen
    quantized node and initializers, in place. Returns {MatMul output: {"algorithm",
    "error", "errors": {algorithm: error}}}."""
    matmuls = weight_matmuls(model)
    x = matmul_activations(model, sorted({a for a, _ in matmuls.values()}), feeds, threads)
    float_inits = {i.name: i for i in model.graph.initializer}
    quantized = {}
    for algorithm, graph in candidates.items():
        arrays = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
        nodes = {n.output[0]: n for n in graph.graph.node if n.op_type == "MatMulNBits"}
        quantized[algorithm] = (graph, arrays, nodes)
    chosen = {}
    for output, (activation, weight_name) in matmuls.items():
        weight = numpy_helper.to_array(float_inits[weight_name]).astype(np.float64)
        errors = {}
        for algorithm, (_, arrays, nodes) in quantized.items():
            if output in nodes:
                errors[algorithm] = relative_output_error(
                    x[activation], weight, dequantized(nodes[output], arrays))
        if errors:
            best = min(errors, key=errors.get)
            chosen[output] = {"algorithm": best, "error": errors[best], "errors": errors}
    _swap_in_(model, {out: quantized[c["algorithm"]] for out, c in chosen.items()})
    return chosen


def _swap_in_(model: onnx.ModelProto, sources: dict[str, tuple]) -> None:
    """Replace each MatMul writing a key of `sources` by the MatMulNBits node writing it in
    the source graph, with that node's initializers (renamed apart per source)."""
    graph = model.graph
    added: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.output or node.output[0] not in sources or node.op_type != "MatMul":
            continue
        source_graph, _, nodes = sources[node.output[0]]
        replacement = onnx.NodeProto()
        replacement.CopyFrom(nodes[node.output[0]])
        source_inits = {init.name: init for init in source_graph.graph.initializer}
        for j, name in enumerate(replacement.input[1:], start=1):
            if not name:
                continue
            renamed = f"{name}.{replacement.name}"
            if renamed not in added:
                init = onnx.TensorProto()
                init.CopyFrom(source_inits[name])
                init.name = renamed
                graph.initializer.append(init)
                added.add(renamed)
            replacement.input[j] = renamed
        graph.node[i].CopyFrom(replacement)
    drop_unused_initializers_(graph)


def drop_unused_initializers_(graph: onnx.GraphProto) -> None:
    """Remove the initializers that no node (nor subgraph) reads and no output names."""
    used = {name for node in graph.node for name in outer_inputs(node)}
    used |= {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def set_accuracy_level_(model: onnx.ModelProto, level: int) -> dict[str, list[int]]:
    """One `accuracy_level` on every MatMulNBits (HQQ's and GPTQ's nodes are written
    without one; 0 leaves it unset, computing in float). Returns {node: [K, N]}."""
    matmuls = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(kept)
        if level:
            node.attribute.append(helper.make_attribute("accuracy_level", level))
        attrs = {a.name: a.i for a in node.attribute}
        matmuls[node.name] = [attrs["K"], attrs["N"]]
    return matmuls


@dataclass
class Int4Result:
    """What `quantize_graph` did: the quantized graph and the manifest's record of it."""

    model: onnx.ModelProto
    matmuls: dict  # {MatMulNBits node: [K, N]}
    choices: dict  # {MatMulNBits node: {"algorithm", "error", "errors"}} ("auto" only)
    embedding: dict | None  # {"bits", "block_size", "node"} of a quantized tied table


def quantize_graph(path: Path, config, feeds=None) -> Int4Result:
    """The graph at `path` with 4-bit weights per `config` (an OnnxExportConfig: block
    size, algorithm, symmetry, accuracy level, embedding bits); `feeds`: calibration input
    dicts, needed by "gptq" and "auto"."""
    return quantize_model(load_model(path), config, feeds)


def quantize_model(model: onnx.ModelProto, config, feeds=None) -> Int4Result:
    """`quantize_graph` on a graph in memory (which it may modify)."""
    block, symmetric = config.int4_block_size, config.int4_symmetric
    head = untie_head_(model) if config.int4_embedding_bits != 32 else None
    if head is not None:
        # the table first, round to nearest (its zero points must be uint8 for the Gather);
        # the other MatMuls excluded
        others = [n.name for n in model.graph.node
                  if n.op_type == "MatMul" and n.output[0] != head.output]
        model = quantized_graph(model, "rtn", block, config.int4_embedding_bits, symmetric,
                                exclude=others)
    algorithm = config.int4_algorithm
    choices = {}
    if algorithm == "auto":
        # GPTQ only symmetric (OnnxExportConfig says why) and with calibration inputs
        names = ["rtn", "hqq"] + (["gptq"] if feeds and symmetric else [])
        candidates = {name: quantized_graph(model, name, block, 4, symmetric, feeds=feeds)
                      for name in names}
        choices = choose_algorithms_(model, candidates, feeds, config.threads)
    else:
        model = quantized_graph(model, algorithm, block, 4, symmetric, feeds=feeds)
    embedding = gather_from_head_(model, head) if head is not None else None
    matmuls = set_accuracy_level_(model, config.int4_accuracy_level)
    names = {n.output[0]: n.name for n in model.graph.node if n.op_type == "MatMulNBits"}
    choices = {names[output]: choice for output, choice in choices.items()}
    return Int4Result(model, matmuls, choices, embedding)


def calibration_ids(elastic, config, sample) -> list[np.ndarray]:
    """Token id batches ((≤ 8, T) int64 each, `config.int4_calibration_samples` rows of
    `config.int4_calibration_tokens` in all, T cut to the model's positions) for GPTQ and
    the error measurements: windows of `config.int4_calibration` text, else the export's
    sample and sequences sampled from the model; random ids without a tokenizer
    (`exporters.common.form_choice.calibration_ids`, shared with ExecuTorch 8da4w)."""
    from flexrank.exporters.common.form_choice import calibration_ids as shared

    return shared(elastic, sample, config.int4_calibration, config.int4_calibration_samples,
                  config.int4_calibration_tokens)


def decoder_feeds(path: Path, batches: list[np.ndarray], threads: int = 2) -> list[dict]:
    """Input dicts of the decoder graph at `path` for a no-cache first call on each batch."""
    from flexrank.runtime.kv_cache import decoder_feed, make_session

    session = make_session(path, threads)
    return [decoder_feed(session, ids, None, 0) for ids in batches]


def int4_report(model: onnx.ModelProto, layers, result: Int4Result, config,
                float_matmuls: list[str]) -> dict:
    """The manifest's `quantization` of an int4 graph: the scheme, and per nested layer
    (`layers`: names) what its MatMuls became: {"bits": 4, "block_size", "algorithm"}
    ("auto": the algorithm chosen for its MatMul, with "error", its relative output error
    on calibration activations, and "errors" of every candidate), or {"bits": 32} when a
    float weight MatMul is left in its scope (node-name scope, or the scope of a fused
    sibling MatMul that holds it). `embedding_bits`: the tied table's bits (32: a float
    Gather, the lm_head reading its transpose; `float_matmuls` lists it)."""
    from flexrank.exporters.onnx.convert import onnx_scope

    def in_layer(node: str, scope: str) -> bool:
        if node.startswith(scope):
            return True
        # a fused sibling MatMul is named after its siblings' common scope
        return "SiblingMatMul" in node and scope.startswith(node.rpartition("/")[0] + "/")

    per_layer = {}
    for name in layers:
        scope = onnx_scope(name)
        if any(in_layer(node, scope) for node in float_matmuls):
            per_layer[name] = {"bits": 32}
            continue
        record = {"bits": 4, "block_size": config.int4_block_size,
                  "algorithm": config.int4_algorithm}
        chosen = [c for node, c in result.choices.items() if in_layer(node, scope)]
        if chosen:
            worst = max(chosen, key=lambda c: c["error"])  # the layer's factors: report worst
            record.update(algorithm=worst["algorithm"], error=worst["error"],
                          errors=worst["errors"])
        per_layer[name] = record
    embedding = result.embedding or {}
    return {"scheme": "int4", "block_size": config.int4_block_size,
            "algorithm": config.int4_algorithm,
            "symmetric": config.int4_symmetric and config.int4_algorithm != "hqq",
            "accuracy_level": config.int4_accuracy_level,
            "embedding_bits": embedding.get("bits", 32),
            "embedding_node": embedding.get("node"),
            "layers": per_layer,
            "matmuls": result.matmuls, "float_matmuls": float_matmuls}
