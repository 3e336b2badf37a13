"""The measured cost model: median onnxruntime seconds of one layer per (m, n, r) on this
host (`LatencyTable`, built by `measure_latency_table`). onnx and onnxruntime are imported
only when a table is measured.

References: DESIGN.md section 4.6 (gauge fixing; measured latencies).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from flexrank.formats import ONNX_IR_VERSION, ONNX_OPSET
from flexrank.planning.costs import check_rank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyTable:
    """Measured seconds per (m, n, r): median onnxruntime time of one layer on this host.

    `entries` holds (m, n, r, seconds) rows; full rank is the dense matmul x @ W, lower
    ranks the gauge-fixed pair of matmuls plus the concat of the identity part.
    """

    entries: tuple[tuple[int, int, int, float], ...]
    threads: int
    batch: int
    repeats: int
    name: str = field(default="latency", init=False)

    def __post_init__(self):
        rows = tuple((int(m), int(n), int(r), float(s)) for m, n, r, s in self.entries)
        object.__setattr__(self, "entries", rows)
        for m, n, r, seconds in rows:
            check_rank(m, n, r)
            if not (np.isfinite(seconds) and seconds >= 0):
                raise ValueError(f"latency {seconds} s for {m}x{n} rank {r} must be finite, >= 0")
        if len({row[:3] for row in rows}) != len(rows):
            raise ValueError("latency table has two entries for the same (m, n, r)")

    @cached_property
    def _seconds(self) -> dict[tuple[int, int, int], float]:
        return {(m, n, r): s for m, n, r, s in self.entries}

    def __call__(self, m: int, n: int, r: int) -> float:
        try:
            return self._seconds[(m, n, r)]
        except KeyError:
            raise ValueError(
                f"no latency measured for a {m}x{n} layer at rank {r}; measure it with "
                "measure_latency_table(shapes, ranks) with this shape and rank included"
            ) from None

    def to_dict(self) -> dict:
        return {"entries": [list(row) for row in self.entries], "threads": self.threads,
                "batch": self.batch, "repeats": self.repeats}

    @classmethod
    def from_dict(cls, data: dict) -> LatencyTable:
        return cls(tuple(tuple(row) for row in data["entries"]), data["threads"],
                   data["batch"], data["repeats"])


def layer_graph(m: int, n: int, r: int, batch: int, seed: int = 0):
    """ONNX graph of one layer y = layer(x), x: (batch, n) -> y: (batch, m), float32.

    Full rank: y = x @ W. Lower rank, gauge-fixed (DESIGN.md 4.6, pivot rows = the
    leading r rows, no reordering): z = x @ V (n, r); y = concat(z, z @ U (r, m - r)).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    check_rank(m, n, r)
    if r == 0:
        raise ValueError(f"a rank-0 {m}x{n} layer computes nothing: there is no graph to time")
    rng = np.random.default_rng(seed)

    def weight(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    if r == min(m, n):
        inits = [weight("W", (n, m))]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    else:
        inits = [weight("V", (n, r)), weight("U", (r, m - r))]
        nodes = [helper.make_node("MatMul", ["x", "V"], ["z"]),  # (batch, r)
                 helper.make_node("MatMul", ["z", "U"], ["t"]),  # (batch, m - r)
                 helper.make_node("Concat", ["z", "t"], ["y"], axis=1)]  # (batch, m)
    graph = helper.make_graph(
        nodes, f"layer_{m}x{n}_r{r}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, m])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    return model


def time_layer(m: int, n: int, r: int, threads: int, batch: int, repeats: int,
               warmup: int = 3) -> float:
    """Median seconds of one onnxruntime run of `layer_graph(m, n, r)` on the CPU."""
    import onnxruntime as ort

    if r == 0:
        return 0.0  # a rank-0 layer outputs zeros (its bias alone): nothing to compute
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(layer_graph(m, n, r, batch).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(1).standard_normal((batch, n)).astype(np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_latency_table(shapes: Sequence[tuple[int, int]], ranks, threads: int = 2,
                          batch: int = 1, repeats: int = 50) -> LatencyTable:
    """Time every distinct (m, n, r) once: `ranks[l]` are the candidate ranks of `shapes[l]`.

    Full rank min(m, n) is always measured (it defines the dense total). Cost: one small
    session per distinct (m, n, r), e.g. 4 shapes x 16 ranks for SmolLM2-135M.
    """
    if len(shapes) != len(ranks):
        raise ValueError(f"{len(shapes)} shapes but {len(ranks)} rows of ranks: pass one per layer")
    if threads < 1 or batch < 1 or repeats < 1:
        raise ValueError(f"threads={threads}, batch={batch}, repeats={repeats} must all be >= 1")
    wanted: dict[tuple[int, int], set[int]] = {}
    for (m, n), row in zip(shapes, ranks, strict=True):
        wanted.setdefault((int(m), int(n)), {min(m, n)}).update(int(r) for r in row)
    entries = []
    for (m, n), shape_ranks in sorted(wanted.items()):
        for r in sorted(shape_ranks):
            entries.append((m, n, r, time_layer(m, n, r, threads, batch, repeats)))
        log.info("timed %dx%d layer at %d ranks (%d threads, batch %d)",
                 m, n, len(shape_ranks), threads, batch)
    return LatencyTable(tuple(entries), threads, batch, repeats)
