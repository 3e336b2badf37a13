"""Edits on exported ONNX graphs: tied weights stored once, factor initializers found by
value and renamed, saving with external data; and the graph plumbing the other passes
share (renaming inputs, subgraphs, topological order, small constants).

Exporters name and fold initializers as they like (`onnx::MatMul_830` is `lm_head.weight`
transposed), so factors are recognised by content, not by name.
"""

from __future__ import annotations

import hashlib
import heapq
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from flexrank.formats import ONNX_IR_VERSION

# Above this a protobuf cannot hold the model: weights go to an external data file.
PROTOBUF_LIMIT = 2 * 1024**3
# Initializers smaller than this stay inside the graph (shape constants, norms).
SMALL_INITIALIZER_BYTES = 1024


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Point every node input (also in subgraphs) that reads `old` at `new`."""
    rename_inputs(graph, {old: new})


def rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Point every node input (also in subgraphs) named in `renames` at its new name,
    following chains (a -> b -> c reads c)."""
    renames = {old: new for old, new in renames.items() if old != new}
    if not renames:
        return

    def resolve(name):
        while name in renames:
            name = renames[name]
        return name

    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = resolve(name)
        for sub in subgraphs(node):
            rename_inputs(sub, renames)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held in `node`'s attributes (If branches, Loop bodies)."""
    found = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        found.extend(attr.graphs)
    return found


def outer_inputs(node: onnx.NodeProto) -> list[str]:
    """The inputs of `node`, and the outer-scope names its subgraphs read."""
    names = list(node.input)
    for sub in subgraphs(node):
        inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input} | \
            {i.name for i in sub.initializer}
        names += [name for n in sub.node for name in outer_inputs(n) if name not in inner]
    return names


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder `graph.node` so every node follows the producers of its inputs (Kahn's
    algorithm, ties broken by the current order)."""
    nodes = list(graph.node)
    producer = {o: i for i, node in enumerate(nodes) for o in node.output if o}
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        deps = {producer[name] for name in outer_inputs(node) if name in producer} - {i}
        waiting[i] = len(deps)
        for j in deps:
            users.setdefault(j, []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        i = heapq.heappop(ready)
        ordered.append(nodes[i])
        for j in users.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(ordered) != len(nodes):
        raise ValueError("the graph has a cycle: it cannot be sorted")
    del graph.node[:]
    graph.node.extend(ordered)


def constant_values(graph: onnx.GraphProto, max_size: int = 16) -> dict[str, np.ndarray]:
    """{name: value} of the graph's small constants: initializers of at most `max_size`
    elements and Constant nodes."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer
              if np.prod(init.dims) <= max_size}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _replace_with_transpose(graph, init, source: str) -> None:
    """Drop initializer `init`; compute it as Transpose(source) instead."""
    name = init.name
    graph.initializer.remove(init)
    graph.node.insert(0, helper.make_node("Transpose", [source], [name], perm=[1, 0],
                                          name=f"{name}_from_{source}"))


def store_tied_once(model: onnx.ModelProto) -> int:
    """Initializers equal to another one, or to its transpose (a tied lm_head exported as
    embedding.T), are replaced by a reference or a Transpose node. Returns how many."""
    graph = model.graph
    by_digest: dict[str, str] = {}
    big = [i for i in graph.initializer if np.prod(i.dims) * 4 >= SMALL_INITIALIZER_BYTES]
    arrays = {i.name: numpy_helper.to_array(i) for i in big}
    for name, array in arrays.items():
        by_digest.setdefault(_digest(array), name)
    removed = 0
    for init in list(big):
        array = arrays[init.name]
        keeper = by_digest[_digest(array)]
        if keeper != init.name:
            graph.initializer.remove(init)
            rename_input(graph, init.name, keeper)
            removed += 1
            continue
        if array.ndim == 2:
            source = by_digest.get(_digest(array.T))
            if source is not None and source != init.name and source in arrays:
                _replace_with_transpose(graph, init, source)
                by_digest.pop(_digest(array))
                removed += 1
    return removed


def canonical_factor_names(model: onnx.ModelProto, factors: dict[str, np.ndarray]) -> set[str]:
    """Rename the initializers holding `factors` ({name: rank-major (r, k) array}) to those
    names, stored rank-major; a factor found transposed becomes a Transpose node over the
    rank-major initializer. Raises ValueError when a factor is not in the graph."""
    graph = model.graph
    wanted = {}
    for name, array in factors.items():
        wanted[_digest(array)] = (name, False)
        wanted.setdefault(_digest(array.T), (name, True))
    found = set()
    for init in list(graph.initializer):
        if len(init.dims) != 2:
            continue
        hit = wanted.get(_digest(numpy_helper.to_array(init)))
        if hit is None or hit[0] in found:
            continue
        name, transposed = hit
        found.add(name)
        if transposed:
            graph.initializer.append(numpy_helper.from_array(factors[name], name))
            _replace_with_transpose(graph, init, name)
        else:
            old = init.name
            init.name = name
            rename_input(graph, old, name)
    # a layer whose output the graph never uses (BERT's pooler under feature extraction)
    # is pruned by the exporter: both factors absent is fine, one of them is not
    layers_found = {name.rsplit(".", 1)[0] for name in found}
    half = sorted(n for n in set(factors) - found if n.rsplit(".", 1)[0] in layers_found)
    if half:
        raise ValueError(f"{len(half)} factors not found in the exported graph "
                         f"(e.g. {half[:2]}): the exporter changed them")
    return found


def save_model(model: onnx.ModelProto, path: Path, external_data: bool = False) -> list[Path]:
    """Save `path` (and `path`_data when external or above 2 GB); returns the files written."""
    path = Path(path)
    model.ir_version = min(model.ir_version, ONNX_IR_VERSION)
    external = external_data or model.ByteSize() >= PROTOBUF_LIMIT
    data_name = path.name + "_data"
    if external:
        (path.parent / data_name).unlink(missing_ok=True)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=SMALL_INITIALIZER_BYTES)
        return [path, path.parent / data_name]
    onnx.save_model(model, str(path))
    return [path]


def load_model(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=True)
