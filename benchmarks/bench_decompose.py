"""Issue 2 benchmark: covariance collection and DataSVD on SmolLM2-135M.

    .venv/bin/python benchmarks/bench_decompose.py [--samples 128 --seq-len 256]

Prints wall time and peak RSS of each stage (targets: < 3 min in all on 2 cores, peak RSS
< 3x the float32 model size) and, per layer type, the relative output error on the
calibration activations of DataSVD vs plain SVD at 25/50/75 % of full rank.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from common import CALIBRATION_SPAN, SHAKESPEARE, stage

import flexrank
from flexrank.compress.decompose import output_error, plain_svd
from flexrank.compress.layers import linear_weight
from flexrank.compress.select import find_targets
from flexrank.table import format_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)

    times: dict = {}
    with stage(times, "load"):
        model, tokenizer = flexrank.load_model("smollm2-135m")
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    batches = flexrank.calibration_data(tokenizer, SHAKESPEARE, num_samples=args.samples,
                                        seq_len=args.seq_len, span=CALIBRATION_SPAN)
    weights = {n: linear_weight(m)[0].double().clone() for n, m in find_targets(model).items()}
    with stage(times, "covariance"):
        stats = flexrank.collect_covariances(model, batches)
    with stage(times, "decompose"):
        flexrank.factorize_(model, stats)

    rows = [[name, t["seconds"], t["peak_rss_gb"], t["peak_rss_gb"] * 1e9 / model_bytes]
            for name, t in times.items()]
    print(format_table(["stage", "seconds", "peak RSS GB", "x fp32 model"], rows,
                       title=f"\nSmolLM2-135M, {args.samples} x {args.seq_len} tokens "
                             f"(fp32 model {model_bytes / 1e9:.3f} GB)"))

    fractions = (0.25, 0.5, 0.75)
    errors = defaultdict(lambda: defaultdict(list))  # type -> (method, fraction) -> [rel err]
    for name, W in weights.items():
        kind = re.sub(r".*\.", "", name)
        layer = model.get_submodule(name)
        cov, _ = stats.covariance(name)
        total = float(torch.einsum("ij,jk,ik->", W, cov, W))
        plain = plain_svd(W)
        for f in fractions:
            r = round(f * layer.max_rank)
            data_err = output_error(W, layer.U.double(), layer.V.double(), r, cov)
            plain_err = output_error(W, plain.U, plain.V, r, cov)
            errors[kind][("data", f)].append(float(data_err) / total)
            errors[kind][("plain", f)].append(float(plain_err) / total)
    rows = []
    for kind, cols in errors.items():
        row = [kind]
        for f in fractions:
            data = sum(cols[("data", f)]) / len(cols[("data", f)])
            plain = sum(cols[("plain", f)]) / len(cols[("plain", f)])
            row += [data, plain]
        rows.append(row)
    headers = ["type"] + [f"{m} @{int(f * 100)}%" for f in fractions for m in ("DataSVD", "SVD")]
    print(format_table(headers, rows, title="\nMean relative output error on calibration "
                                            "activations, ||(W - W_r) X||^2 / ||W X||^2"))


if __name__ == "__main__":
    main()
