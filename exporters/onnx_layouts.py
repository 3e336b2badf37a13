"""The `shared` and `elastic` ONNX layouts (DESIGN.md §5), built from graphs whose factor
initializers carry canonical rank-major names (`<layer>.Vt` (r, n), `<layer>.Ut` (r, m)).

- shared: every graph's initializers point into ONE external file. A factor at rank r is
  the first r rows of the same factor at the largest rank, i.e. a byte prefix, so each
  budget's graph references (offset, r·k·4 bytes) of one block; the other weights
  (embeddings, norms) are stored once by content.
- elastic: one graph at the largest ranks plus an int64 input `rank_level` (shape [1]); per
  factor, Gather(ranks table, rank_level) gives r and Slice takes the first r rows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_graph import ONNX_IR_VERSION, SMALL_INITIALIZER_BYTES, rename_input

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
