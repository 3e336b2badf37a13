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
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from flexrank.exporters.onnx.graph import ONNX_IR_VERSION, SMALL_INITIALIZER_BYTES, rename_input

ALIGNMENT = 64  # bytes between blocks in the shared weight file
RANK_LEVEL = "rank_level"


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
                          ) -> onnx.ModelProto:
    """Like `make_elastic`, but each level is an `If` branch holding the whole graph with
    constant-rank Slices of the shared factors. onnxruntime folds those Slices once, when
    the session is created, so each level runs at its own per-budget speed instead of
    copying every factor on every call; the price is memory: the session holds each lower
    level's sliced factors besides the file's (the top level reads them directly). In place.

    A `rank_level` above the last level runs the last (largest) one.
    """
    graph = model.graph
    if any(i.name == RANK_LEVEL for i in graph.input):
        raise ValueError(f"the graph already has an input named {RANK_LEVEL!r}")
    levels = len(next(iter(factor_ranks.values())))
    outer = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    body = list(graph.node)
    outputs = [o.name for o in graph.output]
    zero = "flexrank.zero"
    graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.int64), zero))

    def typed_like(names: list[str]) -> list[onnx.ValueInfoProto]:
        """Branch outputs named `names`, typed as the graph's outputs."""
        infos = []
        for name, original in zip(names, graph.output, strict=True):
            info = onnx.ValueInfoProto(name=name)
            info.type.CopyFrom(original.type)
            infos.append(info)
        return infos

    def branch(level: int) -> onnx.GraphProto:
        prefix = f"level{level}/"
        sliced = {name: ranks[level] for name, ranks in factor_ranks.items()
                  if ranks[level] < max(ranks)}  # the top level reads the factors as stored
        local = {name: prefix + name for name in sliced}
        nodes, inits = [], []
        for name, rank in sliced.items():
            end = numpy_helper.from_array(np.array([rank], np.int64), f"{prefix}{name}.rank")
            inits.append(end)
            nodes.append(helper.make_node("Slice", [name, zero, end.name, zero], [local[name]]))
        for node in body:
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
            nodes.append(copy)
        return helper.make_graph(nodes, f"level{level}", [],
                                 typed_like([prefix + name for name in outputs]), inits)

    def chain(level: int) -> onnx.GraphProto:
        """Level `level` if rank_level == level, else the chain of the levels above."""
        if level == levels - 1:
            return branch(level)
        k = f"flexrank.level{level}"
        graph.initializer.append(numpy_helper.from_array(np.array([level], np.int64), k))
        cond = f"{k}.is_chosen"
        rest = chain(level + 1)
        node = helper.make_node("If", [cond], [f"{k}/out{i}" for i in range(len(outputs))],
                                then_branch=branch(level), else_branch=rest)
        return helper.make_graph([helper.make_node("Equal", [RANK_LEVEL, k], [cond]), node],
                                 f"from_level{level}", [], typed_like(list(node.output)))

    top = chain(0)
    del graph.value_info[:]  # of the names now inside the branches
    del graph.node[:]
    graph.node.extend(top.node)
    graph.initializer.extend(top.initializer)
    for out, inner in zip(graph.output, top.output, strict=True):  # outputs keep their names
        graph.node.append(helper.make_node("Identity", [inner.name], [out.name]))
    graph.input.append(helper.make_tensor_value_info(RANK_LEVEL, TensorProto.INT64, [1]))
    model.ir_version = min(model.ir_version, ONNX_IR_VERSION)
    return model
