"""Predicted latency per inference of vision models against onnxruntime (issue 19).

A ViT-Tiny-shaped ViT (224×224 images, 16×16 patches, width 192, 12 blocks, 3 heads, MLP
768; 5.7M parameters) and a narrow ResNet-18 (basic blocks 2-2-2-2, widths 32-64-128-256,
224×224), random weights, factorised by DataSVD on random images; each linear/conv keeps
round(f · its max rank) at f = 1, 0.4, 0.2 (a uniform stand-in plan: this measures speed,
not quality). Each budget is exported per budget to ONNX (the shipped exporter, its default
layer forms) and timed in onnxruntime, one thread, batch 1, the budgets' sessions
interleaved inference by inference in one process; medians. The prediction is
`flexrank.device.predict` on the measured host profile from the budget's hook-counted work
(`flexrank.compress.inference_cost`). The CNN's dense graph is also timed at 112×112
against 224×224 (the same graph: its spatial axes are dynamic) against the predicted ratio.

    .venv/bin/python benchmarks/bench_vision_latency.py --out /tmp/flexrank-vision \
        [--reps 30] [--forms default|plain] [--models vit,cnn]

Prints one table per model, with onnxruntime's profile (ms per op type) of the smallest
budget and of dense, and writes results-FORMS.json to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from flexrank.compress.budget_cost import budget_cost
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.select import nested_layers
from flexrank.compress.surgery import factorize_
from flexrank.device.host import resolve_measured
from flexrank.device.predict import default_efficiency, inference_seconds
from flexrank.device.profiles import load_profile
from flexrank.exporters import export
from flexrank.io import write_json_atomic
from flexrank.runtime.kv_cache import make_session
from flexrank.table import format_table

FRACTIONS = (1.0, 0.4, 0.2)


class UniformPlan:
    """Each nested layer keeps round(f · max rank) at budget f (the three attributes of a
    NestedPlan that ElasticModel and the exporters read)."""

    def __init__(self, model, fractions):
        layers = nested_layers(model)
        self.table = {f: {n: max(1, round(f * layer.max_rank)) for n, layer in layers.items()}
                      for f in fractions}
        self.budgets = sorted(self.table)
        self.layer_names = list(layers)

    def ranks_for(self, beta):
        return dict(self.table[beta])


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(
        image_size=224, patch_size=16, num_channels=3, hidden_size=192, num_hidden_layers=12,
        num_attention_heads=3, intermediate_size=768, num_labels=1000)).eval()


def resnet(size=224):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(
        num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128, 256],
        depths=[2, 2, 2, 2], layer_type="basic", num_labels=1000, image_size=size)).eval()


def elastic_of(model) -> ElasticModel:
    images = [torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(i))
              for i in range(2)]
    factorize_(model, collect_covariances(model, images, progress=False), progress=False)
    return ElasticModel(model, UniformPlan(model, FRACTIONS))


def timed(sessions: dict, feeds: dict, reps: int) -> dict:
    """{key: median ms} of sessions[key].run(feeds[key]), interleaved, after 3 warm-ups."""
    times = {key: [] for key in sessions}
    for rep in range(reps + 3):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[key])
            if rep >= 3:
                times[key].append((time.perf_counter() - start) * 1e3)
    return {key: statistics.median(values) for key, values in times.items()}


def op_times(path: Path, feed: dict, out: Path, runs: int = 10) -> dict:
    """{onnxruntime op type: ms per inference} from onnxruntime's own profiler (one thread,
    `runs` inferences after 2 warm-ups), largest first: where the time goes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(out / f"profile-{path.parent.name}-{path.stem}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(2):
        session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    totals = {}
    for e in events:  # node events carry their op type; ts and dur in µs
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= 0:
            op = e["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + e["dur"]
    # the warm-ups are in the file too: scale by runs + 2
    per = {op: us / (runs + 2) / 1e3 for op, us in totals.items()}
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def run_model(name, build, out: Path, reps: int, profile, eff, forms: str) -> dict:
    from flexrank.exporters.common.forms import FormPolicy
    from flexrank.exporters.onnx.convert import OnnxExportConfig

    elastic = elastic_of(build())
    bundle = out / f"{name}-{forms}"
    policy = FormPolicy(gauge_fixing=forms != "plain")  # plain: factors or dense, as counted
    manifest = export(elastic, bundle, config=OnnxExportConfig(forms=policy))
    graphs = {e.beta: bundle / e.graph for e in manifest.budgets}
    forms = {e.beta: dict(e.forms) for e in manifest.budgets}
    sessions = {beta: make_session(path, threads=1) for beta, path in graphs.items()}
    pixels = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    feeds = {beta: {"pixel_values": pixels} for beta in graphs}
    costs = {beta: budget_cost(elastic, beta) for beta in graphs}
    extra = {}
    if name == "cnn":  # the dense graph at half the image size
        sessions["dense@112"] = sessions[1.0]
        feeds["dense@112"] = {"pixel_values": pixels[:, :, :112, :112].copy()}
        small = resnet(112)
        costs["dense@112"] = budget_cost(elastic_of(small), 1.0)
        extra = {"dense@112": 1.0}
    measured = timed(sessions, feeds, reps)
    rows = []
    for key, cost in costs.items():
        seconds, bound = inference_seconds(cost, profile, eff, 0)
        rows.append({"budget": key, "input": cost.inference_input,
                     "gflops": cost.inference_flops / 1e9, "mb_read": cost.inference_bytes / 1e6,
                     "predicted_ms": seconds * 1e3, "bound": bound,
                     "measured_ms": measured[key], "forms": forms.get(extra.get(key, key))})
    for beta in (min(graphs), 1.0):
        ops = op_times(graphs[beta], feeds[beta], out)
        next(r for r in rows if r["budget"] == beta)["op_ms"] = ops
    dense = next(r for r in rows if r["budget"] == 1.0)
    for r in rows:
        r["predicted_ratio"] = r["predicted_ms"] / dense["predicted_ms"]
        r["measured_ratio"] = r["measured_ms"] / dense["measured_ms"]
    return {"model": name, "rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/flexrank-vision")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--forms", choices=("default", "plain"), default="default",
                        help="layer forms of the export: the exporter's default (gauge-fixed "
                             "where well conditioned) or plain factors / dense only, the "
                             "forms the prediction counts")
    parser.add_argument("--models", default="vit,cnn", help="comma-separated: vit, cnn")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    host = resolve_measured(load_profile("host"))
    # the host's figures were measured on all its cores; the sessions here run one thread
    profile = replace(host, compute_gflops=replace(host.compute_gflops,
                                                   value=host.compute_gflops.value
                                                   / host.cores.count.value))
    eff = default_efficiency(profile)
    results = {"host": host.compute_gflops.source, "bandwidth": host.memory_bandwidth_gbps.source,
               "compute_gflops_1_thread": profile.compute_gflops.value, "models": []}
    builders = {"vit": vit, "cnn": resnet}
    for name in args.models.split(","):
        result = run_model(name, builders[name], out, args.reps, profile, eff, args.forms)
        result["forms"] = args.forms
        results["models"].append(result)
        table = [[str(r["budget"]), r["input"], f"{r['gflops']:.3f}", f"{r['mb_read']:.1f}",
                  f"{r['predicted_ms']:.2f} ({r['bound']})", f"{r['measured_ms']:.2f}",
                  f"{r['predicted_ratio']:.2f}", f"{r['measured_ratio']:.2f}",
                  ", ".join(f"{k} {v}" for k, v in (r["forms"] or {}).items())]
                 for r in result["rows"]]
        print(f"\n{name} ({args.forms} layer forms): onnxruntime, 1 thread, batch 1, median "
              f"of {args.reps} interleaved")
        print(format_table(["budget f", "input", "GFLOP", "MB read", "pred. ms (bound)",
                            "meas. ms", "pred. /dense", "meas. /dense", "layer forms"], table))
        for r in result["rows"]:
            if "op_ms" in r:
                top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(r["op_ms"].items())[:6])
                print(f"  f {r['budget']}: onnxruntime profiler, ms per inference: {top}; "
                      f"all ops {sum(r['op_ms'].values()):.1f}")
        write_json_atomic(out / f"results-{args.forms}.json", results)


if __name__ == "__main__":
    main()
