"""Predicted latency per sentence of an encoder checkpoint's budgets (issue 19): the
hook-counted work of one inference (`flexrank.compress.inference_cost`) rescaled to
--tokens, priced by `flexrank.device.predict.inference_seconds` on a profile; nothing is
timed. Compare its ratios to β = 1 with onnxruntime's measured ones (bench_encoder.py).

    .venv/bin/python benchmarks/bench_encoder_predicted.py ELASTIC_DIR [--tokens 22]
        [--profile host]
"""

from __future__ import annotations

import argparse
import logging

import torch

from flexrank.compress.budget_cost import budget_cost
from flexrank.compress.elastic import ElasticModel
from flexrank.device.host import resolve_measured
from flexrank.device.predict import default_efficiency, inference_seconds, inference_work
from flexrank.device.profiles import load_profile
from flexrank.table import format_table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("elastic_dir")
    parser.add_argument("--tokens", type=int, default=22,
                        help="tokens per sentence (bench_encoder.py's held-out mean: 22)")
    parser.add_argument("--profile", default="host")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    elastic = ElasticModel.from_pretrained(args.elastic_dir)
    profile = resolve_measured(load_profile(args.profile))
    eff = default_efficiency(profile)
    rows, dense = [], None
    for beta in sorted(elastic.budgets, reverse=True):
        cost = budget_cost(elastic, beta)
        flops, read = inference_work(cost, args.tokens)
        seconds, bound = inference_seconds(cost, profile, eff, args.tokens)
        dense = dense or seconds
        rows.append([f"{beta:g}", f"{flops / 1e9:.3f}", f"{read / 1e6:.1f}",
                     f"{seconds * 1e3:.2f} ({bound})", f"{seconds / dense:.2f}"])
    print(f"predicted on {profile.name}, one sentence of {args.tokens} tokens (counted at "
          f"{cost.inference_input}, rescaled)")
    print(format_table(["beta", "GFLOP", "MB read", "pred. ms (bound)", "× β = 1"], rows))


if __name__ == "__main__":
    main()
