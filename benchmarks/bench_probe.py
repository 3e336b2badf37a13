"""Probing wall time on SmolLM2-135M, exact vs fast mode, on the decomposed model that
bench_quality.py cached (run that first, same --out).

    .venv/bin/python benchmarks/bench_probe.py --out /tmp/flexrank-bench [--layers 14]

Exact mode over all 210 layers x 16 levels takes too long for this benchmark's budget, so
both modes are timed on the same first --layers layers (which are the most expensive:
probing block b reruns blocks b..29) and the whole-model time is extrapolated from the
measured per-layer cost, stated as such. Block caching is timed against no caching too.

    .venv/bin/python benchmarks/bench_probe.py --out DIR --top-k 64 --samples 4 --layers 6

times the default probe with the full-vocabulary KL against the top-k KL (issue 20),
layer by layer, interleaved, and compares the measured entries.

    .venv/bin/python benchmarks/bench_probe.py --out DIR --dense-check [--rounds 5]

times one forward of the decomposed model at max rank (what every probe pass runs for the
layers it does not cut) with the factors (two matmuls per layer) against
`dense_at_max_rank` (one), interleaved, and reports the logits' difference.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from common import CALIBRATION_SPAN, SHAKESPEARE
from safetensors.torch import load_model as load_st

import flexrank
from flexrank.compress.config import ProbeConfig
from flexrank.compress.elastic import restructure_
from flexrank.compress.pipeline import _safetensors_meta
from flexrank.compress.probe import probe
from flexrank.compress.select import nested_layers
from flexrank.table import format_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/flexrank-bench")
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--top-k", type=int, default=0,
                        help="instead: full-vocabulary KL against top-k KL, interleaved")
    parser.add_argument("--samples", type=int, default=2, help="probe sequences of 256")
    parser.add_argument("--dense-check", action="store_true",
                        help="instead: a max-rank forward, factored against dense_at_max_rank")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    teacher, tokenizer = flexrank.load_model("smollm2-135m")
    student = copy.deepcopy(teacher)
    path = Path(args.out) / "stages" / "decomposed.safetensors"
    restructure_(student, json.loads(_safetensors_meta(path)))
    load_st(student, str(path), strict=False)
    batches = flexrank.calibration_data(tokenizer, SHAKESPEARE, num_samples=args.samples,
                                        seq_len=256, span=CALIBRATION_SPAN, batch_size=2)
    names = list(nested_layers(student))
    if args.top_k:
        return compare_top_k(student, teacher, batches, names[:args.layers], args)
    if args.dense_check:
        return compare_dense(student, batches, args.rounds)
    rows = []
    for mode, cached in (("fast", True), ("exact", True), ("exact", False)):
        start = time.perf_counter()
        config = ProbeConfig(mode=mode, num_levels=16, probe_points=3, top_k=0)
        probe(student, teacher, batches, config, use_block_cache=cached,
              only=names[:args.layers])
        seconds = time.perf_counter() - start
        per_layer = seconds / args.layers
        rows.append([mode, "yes" if cached else "no", args.layers, seconds, per_layer,
                     per_layer * len(names) / 60])
    print(format_table(["mode", "block cache", "layers", "seconds", "s/layer",
                        "extrapolated 210 layers (min)"], rows,
                       title="\nProbe time, SmolLM2-135M, 2 x 256 probe tokens, 16 levels"))


def compare_top_k(student, teacher, batches, names, args) -> None:
    """The default probe (fast, 16 levels, 3 measured ranks) of `names` with the
    full-vocabulary KL and with the top-k KL, twice each in the order A B B A on the same
    batches: seconds per layer (each run's teacher pass and block cache amortised over
    the layers) and how the measured entries agree."""
    configs = {"full KL": ProbeConfig(probe_points=3, top_k=0),
               f"top-{args.top_k} KL": ProbeConfig(probe_points=3, top_k=args.top_k)}
    labels = list(configs)
    seconds = {label: [] for label in labels}
    rows = {}
    for label in labels + labels[::-1]:
        start = time.perf_counter()
        sens = probe(student, teacher, batches, configs[label], only=names, progress=False)
        seconds[label].append((time.perf_counter() - start) / len(names))
        rows[label] = sens.errors[:, sens.meta["probe_levels"]].ravel()
    full, top = rows[labels[0]], rows[labels[1]]
    spearman = np.corrcoef(np.argsort(np.argsort(full)), np.argsort(np.argsort(top)))[0, 1]
    table = [[label, float(np.median(seconds[label])),
              float(np.median(seconds[label])) * 210 / 60] for label in labels]
    print(format_table(["damage", "median s/layer", "x 210 layers (min)"], table,
                       title=f"\nProbe of {len(names)} layers of SmolLM2-135M, "
                             f"{len(batches)} batch(es) of 2 x 256 tokens, fast mode"))
    ratio = np.median(seconds[labels[0]]) / np.median(seconds[labels[1]])
    print(f"time ratio full / top-k: {ratio:.2f}; runs (s/layer): {seconds}")
    print(f"measured entries: {full.size}; Spearman rank correlation {spearman:.4f}; "
          f"top-k / full median {np.median(top / full):.3f} "
          f"(range {np.min(top / full):.3f}-{np.max(top / full):.3f})")


@torch.no_grad()
def compare_dense(student, batches, rounds: int) -> None:
    """Median seconds of a whole forward at max rank, factored vs dense, in turns; the
    dense weights formed once, as a probe does (their cost is reported apart)."""
    from flexrank.compress.layers import dense_at_max_rank

    student.eval()
    batch = batches[0]
    with dense_at_max_rank(nested_layers(student).values()):
        pass  # warm-up of the allocation
    start = time.perf_counter()
    context = dense_at_max_rank(nested_layers(student).values())
    context.__enter__()
    formed = time.perf_counter() - start
    layers = [layer for layer in nested_layers(student).values()
              if layer._dense_at_max_rank is not None]
    dense_weights = [layer._dense_at_max_rank for layer in layers]
    seconds = {"factored": [], "dense": []}
    logits = {}
    try:
        for _ in range(rounds):
            for label in seconds:
                for layer, weight in zip(layers, dense_weights, strict=True):
                    layer._dense_at_max_rank = weight if label == "dense" else None
                start = time.perf_counter()
                logits[label] = student(**batch).logits
                seconds[label].append(time.perf_counter() - start)
    finally:
        context.__exit__(None, None, None)
    factored, dense = (float(np.median(seconds[k])) for k in ("factored", "dense"))
    tokens = batch["input_ids"].numel()
    diff = float((logits["dense"] - logits["factored"]).abs().max())
    print(format_table(["forward at max rank", "median s", "runs (s)"],
                       [[label, float(np.median(v)), " ".join(f"{x:.2f}" for x in v)]
                        for label, v in seconds.items()],
                       title=f"\nSmolLM2-135M decomposed, {tokens} tokens, {rounds} rounds "
                             "in turns"))
    print(f"factored / dense: {factored / dense:.2f}; forming the dense weights once: "
          f"{formed:.2f} s; max |Δ logits| {diff:.2e}")


if __name__ == "__main__":
    main()
