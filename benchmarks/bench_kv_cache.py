"""KV cache updated in place vs copied per token, one decoder graph in onnxruntime.

    .venv/bin/python benchmarks/bench_kv_cache.py GRAPH [GRAPH ...] [--positions 64,1000]

For each graph (a per-budget export whose manifest says `kv_cache_in_place`) and each
prompt length: a prefill of that many tokens, then `--tokens` greedy decode steps, with the
cache in one preallocated buffer per layer that GroupQueryAttention updates in place
(`CacheDecoder(in_place=True)`, what `ElasticSession.generate` does) and with the present
arrays fed back as the next past (`in_place=False`, what optimum's ORTModelForCausalLM
does on CPU). Both run in one session, their steps interleaved one by one so that they
see the same host; the table gives median ms per decode step and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from flexrank.exporters.onnx.attention import kv_cache_in_place
from flexrank.runtime.kv_cache import CacheDecoder


def time_both(session, positions: int, tokens: int) -> tuple[float, float]:
    """(in place, copied): median seconds per decode step after a prompt of `positions`."""
    prompt = np.random.default_rng(0).integers(100, 30000, (1, positions))
    decoders = [CacheDecoder(session, in_place=True, capacity=positions + tokens + 1),
                CacheDecoder(session, in_place=False)]
    ids = [decoder(prompt)[:, -1].argmax(-1)[:, None] for decoder in decoders]
    times = [[], []]
    for _ in range(tokens):
        for i, decoder in enumerate(decoders):
            start = time.perf_counter()
            logits = decoder(ids[i])
            times[i].append(time.perf_counter() - start)
            ids[i] = logits[:, -1].argmax(-1)[:, None]
    if not np.array_equal(ids[0], ids[1]):
        raise AssertionError("in-place and copied caches decoded different tokens")
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    import onnx
    import onnxruntime as ort

    parser = argparse.ArgumentParser()
    parser.add_argument("graphs", nargs="+", type=Path)
    parser.add_argument("--positions", default="64,1000", help="prompt lengths")
    parser.add_argument("--tokens", type=int, default=30, help="decode steps timed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = ["| graph | cached positions | in place ms/token | copied ms/token | ratio |",
            "|---|---|---|---|---|"]
    for path in args.graphs:
        if not kv_cache_in_place(onnx.load(str(path), load_external_data=False).graph):
            raise SystemExit(f"{path}: its cache is read by more than GroupQueryAttention; "
                             "export it again with this version (simplify on)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for positions in (int(p) for p in args.positions.split(",")):
            in_place, copied = time_both(session, positions, args.tokens)
            rows.append(f"| {path.parent.name}/{path.name} | {positions} | {1e3 * in_place:.2f} "
                        f"| {1e3 * copied:.2f} | {in_place / copied:.3f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
