"""Probing wall time on SmolLM2-135M, exact vs fast mode, on the decomposed model that
bench_quality.py cached (run that first, same --out).

    .venv/bin/python benchmarks/bench_probe.py --out /tmp/flexrank-bench [--layers 14]

Exact mode over all 210 layers x 16 levels takes too long for this benchmark's budget, so
both modes are timed on the same first --layers layers (which are the most expensive:
probing block b reruns blocks b..29) and the whole-model time is extrapolated from the
measured per-layer cost, stated as such. Block caching is timed against no caching too.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

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
    args = parser.parse_args()
    torch.set_num_threads(2)
    teacher, tokenizer = flexrank.load_model("smollm2-135m")
    student = copy.deepcopy(teacher)
    path = Path(args.out) / "stages" / "decomposed.safetensors"
    restructure_(student, json.loads(_safetensors_meta(path)))
    load_st(student, str(path), strict=False)
    batches = flexrank.calibration_data(tokenizer, SHAKESPEARE, num_samples=2, seq_len=256,
                                        span=CALIBRATION_SPAN, batch_size=2)
    names = list(nested_layers(student))
    rows = []
    for mode, cached in (("fast", True), ("exact", True), ("exact", False)):
        start = time.perf_counter()
        probe(student, teacher, batches, ProbeConfig(mode=mode, num_levels=16),
              use_block_cache=cached, only=names[:args.layers])
        seconds = time.perf_counter() - start
        per_layer = seconds / args.layers
        rows.append([mode, "yes" if cached else "no", args.layers, seconds, per_layer,
                     per_layer * len(names) / 60])
    print(format_table(["mode", "block cache", "layers", "seconds", "s/layer",
                        "extrapolated 210 layers (min)"], rows,
                       title="\nProbe time, SmolLM2-135M, 2 x 256 probe tokens, 16 levels"))



if __name__ == "__main__":
    main()
