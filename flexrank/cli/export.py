"""`flexrank-export` (= `flexrank export`) and `flexrank profiles`.

Stages of an export, each announced with its time: [1] the elastic checkpoint (loaded,
or built by `compress` with fast defaults and cached), [2] the budget decision for the
profile, [3] the export with validation against PyTorch, [4] host measurement of the
exported budget in onnxruntime, [5] the manifest with the decision, the measured host
figures and the predicted device figures.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from pathlib import Path

from flexrank.compress.aliases import DEFAULT_MODEL
from flexrank.device.host import host_threads
from flexrank.io import cache_dir

FORMATS = ("onnx", "ort", "executorch")
LAYOUTS = ("per-budget", "shared", "elastic")
MEASURE_NEW_TOKENS = 16  # decoded tokens timed on the host (median and p90 over them)


class Stages:
    """Prints `[i/n] name ...` and the seconds each stage took (the CLI's progress)."""

    def __init__(self, total: int):
        self.total, self.index, self.times = total, 0, {}

    def start(self, name: str) -> None:
        self.index += 1
        self.name, self.started = name, time.perf_counter()
        print(f"[{self.index}/{self.total}] {name} ...", flush=True)

    def done(self, note: str = "") -> None:
        seconds = time.perf_counter() - self.started
        self.times[self.name] = seconds
        print(f"[{self.index}/{self.total}] {self.name}: {seconds:.1f} s{note}", flush=True)


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", default=DEFAULT_MODEL,
                   help="elastic checkpoint (a `flexrank compress` output folder) or a model "
                        f"(alias, HF folder, .gguf) to compress first (default: {DEFAULT_MODEL})")
    p.add_argument("--profile", help="device profile: a shipped name (`flexrank profiles`) or "
                                     "a YAML file; needed for --budget auto")
    p.add_argument("--budget", default="auto",
                   help="auto (largest budget meeting the profile's targets), all, or a β of "
                        "the plan (default: auto)")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--layout", choices=LAYOUTS, default="per-budget")
    p.add_argument("--quantize", choices=("none", "int8"), default="none")
    p.add_argument("-o", "--output", default="dist", help="bundle folder (must be empty)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the budget decision and write nothing")
    p.add_argument("--work-dir", help="where a plain model's compress run is cached "
                                      "(default: compress/<model> in $FLEXRANK_CACHE, "
                                      "else ~/.cache/flexrank)")
    p.add_argument("--budgets", default="1,0.8,0.6,0.4",
                   help="budgets of the plan when compressing a plain model")
    p.add_argument("--steps", type=int, default=None,
                   help="distillation steps when compressing a plain model (default: fast "
                        "defaults, see flexrank.compress.pipeline.fast_compress_config)")


def _parse_budget(text: str) -> str | float:
    if text in ("auto", "all"):
        return text
    try:
        beta = float(text)
    except ValueError:
        raise ValueError(f"--budget {text!r}: give auto, all or a number like 0.6") from None
    if not 0 < beta <= 1:
        raise ValueError(f"--budget {beta} is out of range (0, 1]")
    return beta


def _exporter_available(fmt: str) -> None:
    from flexrank.exporters import EXPORTERS

    if fmt in EXPORTERS:
        return
    try:  # formats outside the core register themselves when their module is imported
        importlib.import_module(f"flexrank.exporters.{fmt}")
    except ImportError as err:
        raise ValueError(f"--format {fmt} is not available in this installation ({err}); "
                         f"available: {', '.join(sorted(EXPORTERS))}") from None
    if fmt not in EXPORTERS:
        raise ValueError(f"--format {fmt} is not available in this installation; available: "
                         f"{', '.join(sorted(EXPORTERS))}")


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} is not empty: choose a new -o folder or remove "
                         "it (a bundle is never written over another)")


def _default_work_dir(source: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(source)).strip("_") or "model"
    return cache_dir("compress", f"{slug}-fast")


def load_or_compress(args):
    """An ElasticModel from an elastic folder, or `compress` with fast defaults (cached)."""
    from flexrank.compress.elastic import META_FILE, ElasticModel, resolve_elastic_dir
    from flexrank.compress.pipeline import fast_compress_config

    source = Path(str(args.source)).expanduser()
    if source.is_dir() and (resolve_elastic_dir(source) / META_FILE).is_file():
        print(f"    elastic checkpoint {source}")
        return ElasticModel.from_pretrained(source)
    from flexrank.compress.pipeline import compress

    budgets = tuple(float(b) for b in args.budgets.split(","))
    config = fast_compress_config(budgets)
    if args.steps is not None:
        from dataclasses import replace

        config = replace(config, distill=replace(config.distill, steps=args.steps))
    work = Path(args.work_dir) if args.work_dir else _default_work_dir(args.source)
    print(f"    compressing {args.source} with fast defaults into {work} (cached: a second "
          "run starts at the export)", flush=True)
    elastic, summary = compress(args.source, work, config)
    print(summary)
    return elastic


def _budgets_to_export(elastic, request, decision, layout: str) -> list[float]:
    if request == "all":
        return list(elastic.budgets)
    if request == "auto":
        # shared/elastic bundles exist to switch budgets: ship them all, default to the choice
        return [decision.beta] if layout == "per-budget" else list(elastic.budgets)
    return [elastic._match_budget(request)]  # BudgetError lists the plan's budgets


def cmd_export(args) -> int:
    from flexrank.compress.budget_cost import budget_costs
    from flexrank.device.decide import choose_budget
    from flexrank.device.profiles import load_profile

    request = _parse_budget(args.budget)
    if request == "auto" and not args.profile:
        raise ValueError("--budget auto needs --profile NAME|FILE (see `flexrank profiles`)")
    profile = load_profile(args.profile) if args.profile else None
    _exporter_available(args.format)
    out = Path(args.output)
    if not args.dry_run:
        _check_output(out)
    quantize = None if args.quantize == "none" else args.quantize
    stages = Stages(3 if args.dry_run else 5)

    stages.start("elastic checkpoint")
    elastic = load_or_compress(args)
    stages.done(f" (budgets {elastic.budgets})")

    stages.start("budget decision" + (f" for {profile.name}" if profile else ""))
    costs = budget_costs(elastic, quantize)
    decision = choose_budget(costs, profile) if profile else None
    if isinstance(request, float):
        request = elastic._match_budget(request)
    stages.done()
    if decision is not None:
        print(decision.table())
    if request == "auto" and decision.beta is None:
        print(f"error: no budget fits {profile.name}. {decision.explanation}", file=sys.stderr)
        return 1
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    budgets = _budgets_to_export(elastic, request, decision, args.layout)
    fits = decision is not None and decision.beta is not None
    chosen = decision.beta if fits and decision.beta in budgets else max(budgets)
    if decision is not None and request != "auto":
        row = next(r for r in decision.rows if r.beta == chosen)
        if not row.fits:
            print(f"note: β {chosen:g} does not meet {profile.name}'s targets (predicted): "
                  + "; ".join(c.describe() for c in row.failures))

    from flexrank.exporters import export

    stages.start(f"export {args.format}/{args.layout} of β {budgets} with validation")
    manifest = export(elastic, out, format=args.format, layout=args.layout, budgets=budgets,
                      quantize=quantize)
    stages.done()
    for entry in manifest["budgets"]:
        v = entry.get("validation") or {}
        print(f"    β {entry['beta']:g}: {entry['bytes'] / 2**20:.1f} MiB, validation max "
              f"|Δ| {v.get('max_abs_diff', float('nan')):.3g}, top-1 agreement "
              f"{v.get('top1_agreement', float('nan')):.4f}")

    stages.start(f"host measurement of β {chosen:g} in onnxruntime")
    host = measure_bundle(out, chosen, profile, args.format)
    stages.done()
    if host:
        print("    " + describe_host(host))

    stages.start("manifest")
    write_deployment(out, elastic, costs, decision, chosen, request, host, profile)
    stages.done()
    print(f"bundle: {out} (β {chosen:g}" + (f" for {profile.name})" if profile else ")"))
    return 0


def measure_bundle(out: Path, beta: float, profile, fmt: str) -> dict | None:
    if fmt == "executorch":
        print("    (ExecuTorch programs are validated by the exporter; host timing here is "
              "for onnxruntime bundles only)")
        return None
    from flexrank.device.host import host_key
    from flexrank.runtime.session import ElasticSession

    session = ElasticSession(out, budget=beta, threads=host_threads(profile))
    prompt = profile.targets.prompt_tokens if profile else 64
    figures = session.measure(prompt_tokens=prompt, new_tokens=MEASURE_NEW_TOKENS)
    figures["host"] = host_key()
    return figures


def describe_host(h: dict) -> str:
    if "latency_ms" in h:
        return (f"measured on host ({h['threads']} threads): {h['latency_ms']:.1f} ms per "
                f"forward of {h['prompt_tokens']} tokens, peak RSS {h['peak_rss_mb']:.0f} MiB")
    return (f"measured on host ({h['threads']} threads): TTFT {h['ttft_s']:.3f} s for "
            f"{h['prompt_tokens']} tokens, decode {h['decode_ms_median']:.1f} ms/token median, "
            f"{h['decode_ms_p90']:.1f} p90 ({h['decode_tokens_per_s']:.1f} tok/s), load "
            f"{h['load_s']:.2f} s, peak RSS {h['peak_rss_mb']:.0f} MiB")


def write_deployment(out: Path, elastic, costs, decision, chosen, request, host, profile):
    """Add the decision, host and device figures to the manifest (re-hashed, atomic)."""
    from flexrank.manifest import load_manifest, write_manifest

    manifest = load_manifest(out)
    manifest["extra_files"] = list(manifest.pop("files"))
    manifest["budget_costs"] = [cost_dict(c) for c in costs]
    manifest["deployment"] = {
        "profile": profile.name if profile else None, "budget_request": str(request),
        "chosen_beta": chosen, "threads": profile.threads if profile else None}
    if decision is not None:
        manifest["profiles"] = {profile.name: decision.to_dict()}
        manifest["predicted_device_latency"] = {
            "label": f"predicted for {profile.name} by flexrank.device.predict (not measured)",
            "profile": profile.name,
            "budgets": [{"beta": b["beta"], "ttft_s": b["ttft_s"],
                         "decode_tokens_per_s": b["decode_tokens_per_s"],
                         "memory_gb": b["memory_gb"], "fits": b["fits"]}
                        for b in decision.to_dict()["budgets"]]}
    if host is not None:
        manifest["host_latency"] = {**host, "label": f"measured on host {host['host']} in "
                                                     f"onnxruntime ({host['threads']} threads)"}
    write_manifest(out, manifest)


def cost_dict(cost) -> dict:
    from dataclasses import asdict

    return asdict(cost)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="pick a budget for a device profile, export it, validate "
                                      "it and measure it (= flexrank-export)")
    add_export_args(p)
    p.set_defaults(func=cmd_export)
