"""The `shared` and `elastic` ONNX layouts (DESIGN.md §5), built from graphs whose factor
initializers carry canonical rank-major names (`<layer>.Vt` (r, n), `<layer>.Ut` (r, m)).

- shared: every graph's initializers point into ONE external file. A factor at rank r is
  the first r rows of the same factor at the largest rank, i.e. a byte prefix, so each
  budget's graph references (offset, r·k·4 bytes) of one block; the other weights
  (embeddings, norms) are stored once by content.
- elastic: one graph at the largest ranks plus an int64 input `rank_level` (shape [1]).
  Default (`make_elastic`): per factor, Gather(ranks table, rank_level) gives r and Slice
  takes the first r rows, on every call: one copy of the factors in memory, but each call
  copies the chosen prefixes. `make_elastic_branches` (OnnxExportConfig(elastic_branches=
  True)): one `If` branch per level with constant-rank Slices, which onnxruntime folds
  at session creation: near per-budget speed, every level's factors held in memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flexrank.exporters.onnx.graph import SMALL_INITIALIZER_BYTES, rename_input
from flexrank.formats import ONNX_IR_VERSION, RANK_LEVEL

ALIGNMENT = 64  # bytes between blocks in the shared weight file


def _set_external(init: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    del init.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value


def write_shared(graphs: dict[str, onnx.ModelProto], factor_names: set[str], folder: Path,
                 weights_name: str = "weights.bin") -> dict[str, int]:
    """Save `graphs` ({file name: model}, largest ranks first) into `folder` over one weight
    file. Returns {file name: bytes of the graph file}."""
    blocks: dict[str, tuple[int, int]] = {}  # factor name or content digest -> (offset, len)
    sizes = {}
    with open(folder / weights_name, "wb") as data:
        for file_name, model in graphs.items():
            for init in model.graph.initializer:
                raw = numpy_helper.to_array(init).tobytes()
                if len(raw) < SMALL_INITIALIZER_BYTES and init.name not in factor_names:
                    continue
                key = init.name if init.name in factor_names else hashlib.sha256(raw).hexdigest()
                if key in blocks:
                    offset, length = blocks[key]
                    if len(raw) > length:
                        raise ValueError(f"{init.name} in {file_name} holds more ranks than the "
                                         "first graph: pass the graphs largest ranks first")
                    _check_prefix(folder / weights_name, data, offset, raw, init.name)
                else:
                    offset = -data.tell() % ALIGNMENT + data.tell()
                    data.write(b"\0" * (offset - data.tell()))
                    data.write(raw)
                    blocks[key] = (offset, len(raw))
                _set_external(init, weights_name, offset, len(raw))
            model.ir_version = min(model.ir_version, ONNX_IR_VERSION)
            onnx.save_model(model, str(folder / file_name))
            sizes[file_name] = (folder / file_name).stat().st_size
    return sizes


def _check_prefix(path: Path, writer, offset: int, raw: bytes, name: str) -> None:
    writer.flush()
    with open(path, "rb") as f:
        f.seek(offset)
        if f.read(len(raw)) != raw:
            raise ValueError(f"{name}: the smaller budget's factor is not a prefix of the "
                             "larger one's (the plan is not nested?)")


def make_elastic(model: onnx.ModelProto, factor_ranks: dict[str, list[int]]) -> onnx.ModelProto:
    """Add `rank_level` and slice every factor to the rank of the chosen level, in place.

    `factor_ranks[name][k]` is the rank of factor `name` at level k (budgets ascending).
    """
    graph = model.graph
    if any(i.name == RANK_LEVEL for i in graph.input):
        raise ValueError(f"the graph already has an input named {RANK_LEVEL!r}")
    graph.input.append(helper.make_tensor_value_info(RANK_LEVEL, TensorProto.INT64, [1]))
    zero = "flexrank.zero"
    nodes = [helper.make_node("Constant", [], [zero],
                              value=numpy_helper.from_array(np.zeros(1, np.int64)))]
    for name, ranks in factor_ranks.items():
        prefix, rank = f"{name}.prefix", f"{name}.rank"
        rename_input(graph, name, prefix)
        graph.initializer.append(numpy_helper.from_array(np.asarray(ranks, np.int64),
                                                         f"{name}.ranks"))
        nodes += [helper.make_node("Gather", [f"{name}.ranks", RANK_LEVEL], [rank], axis=0),
                  helper.make_node("Slice", [name, zero, rank, zero], [prefix])]
    for node in reversed(nodes):
        graph.node.insert(0, node)
    model.ir_version = min(model.ir_version, ONNX_IR_VERSION)
    return model


def make_elastic_branches(model: onnx.ModelProto, factor_ranks: dict[str, list[int]],
                          node_attributes: dict[str, dict[str, list[int]]] | None = None,
                          ) -> onnx.ModelProto:
    """Like `make_elastic`, but each level is an `If` branch holding the whole graph with
    constant-rank Slices of the shared factors. onnxruntime folds those Slices once, when
    the session is created, so each level runs at its own per-budget speed instead of
    copying every factor on every call; the price is memory: the session holds each lower
    level's sliced factors besides the file's (the top level reads them directly). In place.

    A `rank_level` above the last level runs the last (largest) one. `node_attributes`
    ({node name: {integer attribute: value per level}}) sets attributes per level: the K
    or N of a MatMulNBits over sliced 4-bit factors (`int4_layouts`).
    """
    graph = model.graph
    if any(i.name == RANK_LEVEL for i in graph.input):
        raise ValueError(f"the graph already has an input named {RANK_LEVEL!r}")
    source = _Levels(body=list(graph.node), outputs=list(graph.output),
                     outer={i.name for i in graph.input} | {i.name for i in graph.initializer},
                     factor_ranks=factor_ranks, node_attributes=node_attributes or {})
    graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.int64), _ZERO))
    top = _level_chain(source, graph, 0)
    del graph.value_info[:]  # of the names now inside the branches
    del graph.node[:]
    graph.node.extend(top.node)
    graph.initializer.extend(top.initializer)
    for out, inner in zip(graph.output, top.output, strict=True):  # outputs keep their names
        graph.node.append(helper.make_node("Identity", [inner.name], [out.name]))
    graph.input.append(helper.make_tensor_value_info(RANK_LEVEL, TensorProto.INT64, [1]))
    model.ir_version = min(model.ir_version, ONNX_IR_VERSION)
    return model


_ZERO = "flexrank.zero"  # int64 [0]: the Slices' start and axis


@dataclass
class _Levels:
    """The original graph that every level's branch copies."""

    body: list[onnx.NodeProto]  # its nodes
    outputs: list[onnx.ValueInfoProto]  # its outputs (names and types)
    outer: set[str]  # graph inputs and initializers: read from the branches as they are
    factor_ranks: dict[str, list[int]]  # factor -> its rank at each level
    node_attributes: dict[str, dict[str, list[int]]]  # node -> {attribute: value per level}

    @property
    def count(self) -> int:
        return len(next(iter(self.factor_ranks.values())))


def _typed_like(names: list[str], outputs: list[onnx.ValueInfoProto]) -> list[onnx.ValueInfoProto]:
    """Branch outputs named `names`, typed as the graph's `outputs`."""
    infos = []
    for name, original in zip(names, outputs, strict=True):
        info = onnx.ValueInfoProto(name=name)
        info.type.CopyFrom(original.type)
        infos.append(info)
    return infos


def _level_chain(source: _Levels, graph: onnx.GraphProto, level: int) -> onnx.GraphProto:
    """Level `level` if rank_level == level, else the chain of the levels above; each
    level's index constant goes into `graph`'s initializers."""
    if level == source.count - 1:
        return _level_branch(source, level)
    k = f"flexrank.level{level}"
    graph.initializer.append(numpy_helper.from_array(np.array([level], np.int64), k))
    cond = f"{k}.is_chosen"
    rest = _level_chain(source, graph, level + 1)
    node = helper.make_node("If", [cond], [f"{k}/out{i}" for i in range(len(source.outputs))],
                            then_branch=_level_branch(source, level), else_branch=rest)
    return helper.make_graph([helper.make_node("Equal", [RANK_LEVEL, k], [cond]), node],
                             f"from_level{level}", [],
                             _typed_like(list(node.output), source.outputs))


def _level_branch(source: _Levels, level: int) -> onnx.GraphProto:
    """The whole graph at `level`: the factors sliced to the level's ranks, every other
    name inside the branch prefixed with `level<k>/`."""
    prefix = f"level{level}/"
    sliced = {name: ranks[level] for name, ranks in source.factor_ranks.items()
              if ranks[level] < max(ranks)}  # the top level reads the factors as stored
    local = {name: prefix + name for name in sliced}
    nodes, inits = [], []
    for name, rank in sliced.items():
        end = numpy_helper.from_array(np.array([rank], np.int64), f"{prefix}{name}.rank")
        inits.append(end)
        nodes.append(helper.make_node("Slice", [name, _ZERO, end.name, _ZERO], [local[name]]))
    for node in source.body:
        copied = _renamed_copy(node, local, source.outer, prefix)
        for attr in copied.attribute:
            values = source.node_attributes.get(node.name, {}).get(attr.name)
            if values is not None:
                attr.i = values[level]
        nodes.append(copied)
    outputs = _typed_like([prefix + o.name for o in source.outputs], source.outputs)
    return helper.make_graph(nodes, f"level{level}", [], outputs, inits)


def _renamed_copy(node: onnx.NodeProto, local: dict[str, str], outer: set[str],
                  prefix: str) -> onnx.NodeProto:
    """`node` reading the sliced factors (`local`) and, for names computed inside the
    graph, their `prefix`ed copies; its outputs and name prefixed."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for i, name in enumerate(copy.input):
        if name in local:
            copy.input[i] = local[name]
        elif name and name not in outer:
            copy.input[i] = prefix + name
    for i, name in enumerate(copy.output):
        if name:
            copy.output[i] = prefix + name
    if copy.name:
        copy.name = prefix + copy.name
    return copy
