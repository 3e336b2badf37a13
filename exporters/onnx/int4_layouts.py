"""int4 in the `shared` and `elastic` layouts (DESIGN.md §5): 4-bit blocks whose rank
prefix is a byte prefix.

A factor pair y = U_r (V_rᵀ x) is two MatMuls. MatMulNBits quantizes its weight B (K, N)
in blocks along K and stores them N-major: codes (N, ⌈K/b⌉, b/2), scales (N, ⌈K/b⌉).
- First factor, B = V_r (n, r): the rank is N, the outer axis, so the codes and scales of
  rank r are the first r rows of those at rank R (each block lies inside one rank row).
- Second factor, B = U_rᵀ (r, m): the rank is K, and a rank prefix is the first r/b blocks
  of every row: not contiguous. The exporter stores these tensors block-major
  ((⌈K/b⌉, N, b/2), (⌈K/b⌉, N)), whose first r/b rows are the prefix, with a Transpose
  back to MatMulNBits' layout in the graph (onnxruntime folds it at session creation).
With ranks multiples of b, symmetric RTN's blocks depend on their own weights only, so the
rank-r blocks equal the first blocks at rank R (`write_shared` checks it byte for byte);
GPTQ and HQQ are refused here (`check_layout_config` says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from flexrank.exporters.onnx.graph import rename_input
from flexrank.exporters.onnx.int4 import quantize_model


@dataclass(frozen=True)
class RankTensor:
    """A quantized factor tensor stored with the rank on axis 0."""

    layer: str
    axis: str  # "N": axis 0 counts ranks (first factor); "K": it counts rank blocks


def check_layout_config(config, layout: str) -> None:
    """Refuse int4 options whose blocks are not rank prefixes, naming what to use: only
    symmetric round-to-nearest quantizes each block from its own weights alone. GPTQ's
    blocks depend on each rank's calibration activations; HQQ's iterations stop on the
    whole tensor's error (its K-rank zero points at rank r differ from the first blocks at
    rank R: `write_shared`'s prefix check fails); asymmetric RTN packs two blocks' zero
    points a byte along the rank."""
    if config.int4_algorithm != "rtn" or not config.int4_symmetric:
        raise ValueError(f"int4_algorithm {config.int4_algorithm!r} (symmetric "
                         f"{config.int4_symmetric}) with the {layout} layout: a rank prefix "
                         "of its 4-bit blocks is not a prefix of the blocks; use "
                         "int4_algorithm='rtn' with int4_symmetric=True, or the per-budget "
                         "layout")


def _fold_factor_transposes_(model: onnx.ModelProto, factor_names: set[str]) -> dict[str, str]:
    """Give each first factor's MatMul a constant weight: Transpose(<layer>.Vt) becomes an
    initializer <layer>.Vt.T (n, r), so the quantizer sees it. Returns {weight: factor}."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    weights = {}
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in factor_names]:
        array = numpy_helper.to_array(inits[node.input[0]])
        name = node.input[0] + ".T"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T), name))
        rename_input(graph, node.output[0], name)
        graph.node.remove(node)
        weights[name] = node.input[0]
    for name in factor_names:
        weights.setdefault(name, name)  # second factors: read as stored, (r, m)
    return weights


def quantize_factor_graph(model: onnx.ModelProto, factor_names: set[str], config,
                          ) -> tuple[onnx.ModelProto, dict[str, RankTensor], dict[str, str]]:
    """Quantize a plain rank-major factor graph (canonical names, `graph.canonical_factor_
    names`) for the shared/elastic layouts: every MatMul to MatMulNBits (`int4.quantize_
    model`), then each factor's codes, scales and zero points renamed `<factor>.q`,
    `.scales`, `.zero_points` and stored rank on axis 0 (module docstring).

    Returns (graph, {tensor: RankTensor}, {MatMulNBits node: "K" or "N"}, the attribute
    that equals the layer's rank)."""
    weights = _fold_factor_transposes_(model, factor_names)
    result = quantize_model(model, config)
    graph = result.model.graph
    inits = {i.name: i for i in graph.initializer}
    tensors, nodes = {}, {}
    for node in [n for n in graph.node if n.op_type == "MatMulNBits"]:
        weight = next((w for w in weights if node.input[1] == f"{w}_Q4"), None)
        if weight is None:
            continue  # not a factor (the tied lm_head, a dense layer)
        factor = weights[weight]
        axis = "N" if weight != factor else "K"
        attrs = {a.name: a.i for a in node.attribute}
        n, blocks = attrs["N"], -(-attrs["K"] // attrs["block_size"])
        nodes[node.name] = axis
        for role, slot in (("q", 1), ("scales", 2), ("zero_points", 3)):
            if slot >= len(node.input) or not node.input[slot]:
                continue
            original = inits[node.input[slot]]
            array = numpy_helper.to_array(original)
            if role != "q":
                array = array.reshape(n, blocks if array.dtype != np.uint8 else -1)
                if role == "zero_points" and axis == "K" and array.dtype == np.uint8:
                    raise ValueError(f"{factor}: packed 4-bit zero points along the rank "
                                     "(asymmetric RTN) cannot be rank prefixes")
            stored = f"{factor}.{role}"
            if axis == "K":  # block-major, and a Transpose back to (N, blocks, ...)
                perm = [1, 0, 2] if array.ndim == 3 else [1, 0]
                array = np.ascontiguousarray(array.transpose(perm))
                graph.node.insert(0, helper.make_node("Transpose", [stored], [f"{stored}.nk"],
                                                      perm=perm, name=f"{stored}/Transpose"))
                node.input[slot] = f"{stored}.nk"
            else:
                node.input[slot] = stored
            graph.initializer.append(numpy_helper.from_array(array, stored))
            graph.initializer.remove(original)
            tensors[stored] = RankTensor(factor.rsplit(".", 1)[0], axis)
    return result.model, tensors, nodes
