"""Peak memory and load time of one onnxruntime session over an exported graph.

    .venv/bin/python benchmarks/bench_session_memory.py GRAPH.onnx [--levels 0,1,2]

Creates the session (2 threads), runs one 16-token prefill (per `rank_level` for an
elastic graph) and prints the load time and the process's peak RSS. Run one graph per
process: the peak is the process's.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import onnxruntime as ort

from flexrank.exporters.onnx.layouts import RANK_LEVEL
from flexrank.runtime.kv_cache import decoder_feed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("graph")
    parser.add_argument("--levels", default=None, help="rank_level values to run, e.g. 0,1,2")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    start = time.perf_counter()
    session = ort.InferenceSession(args.graph, options, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - start
    ids = np.random.default_rng(0).integers(100, 1000, (1, 16))
    feed = decoder_feed(session, ids, None, 0)
    for level in args.levels.split(",") if args.levels else [None]:
        if level is not None:
            feed[RANK_LEVEL] = np.array([int(level)], np.int64)
        session.run(["logits"], feed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(f"{args.graph}: load {load:.1f} s, peak RSS {peak / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
