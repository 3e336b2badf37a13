"""ExecuTorch export benchmark on SmolLM2-135M, XNNPACK on this CPU, all in one run.

    .venv/bin/python benchmarks/bench_executorch.py [--threads 2] [--budgets 0.5,0.75,1]

The same factors and uniform plan as `bench_onnx.py` (DataSVD from a small tinyshakespeare
calibration; each layer keeps the largest r with r(m + n − r) ≤ β·m·n), then per budget:

- float32 `.pte` (gauge-fixed forms, as the ONNX path), and the same with 8da4w (int8
  dynamic activations, int4 weights in groups of 32; ranks aligned to 32, plain factors);
- prefill time for a 64-token prompt and decode ms/token (median of `--decode-tokens`
  steps through the static KV cache) in `executorch.runtime`, against the dense `.pte`
  (β = 1); file sizes; the exporter's validation (max |Δlogits|, top-1, greedy 20 tokens);
- with `--onnx` (default), the per-budget ONNX export of the same plan timed in
  onnxruntime in the same rounds, so that the two runtimes are compared side by side.

Every program is timed in `--rounds` round-robin rounds, best median kept (the host is
shared; see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_onnx import time_alone, uniform_smollm2

from flexrank.exporters import EXPORTERS, export
from flexrank.exporters.executorch.export import ExecutorchExportConfig
from flexrank.exporters.executorch.validate import load_method
from flexrank.manifest import load_manifest, write_manifest

PROMPT = 64
WARMUP = 3


def time_pte(path: Path, decode_tokens: int) -> tuple[float, float]:
    """(prefill seconds for a 64-token prompt, median decode seconds per token)."""
    forward = load_method(path)
    prompt = torch.randint(100, 40000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(PROMPT)
    prefill = []
    for _ in range(5):
        start = time.perf_counter()
        logits = forward.execute([prompt, positions])[0]
        prefill.append(time.perf_counter() - start)
    token, steps = logits[:, -1].argmax(-1, keepdim=True), []
    for i in range(decode_tokens + WARMUP):
        start = time.perf_counter()
        logits = forward.execute([token, torch.tensor([PROMPT + i])])[0]
        if i >= WARMUP:
            steps.append(time.perf_counter() - start)
        token = logits[:, -1].argmax(-1, keepdim=True)
    return statistics.median(prefill), statistics.median(steps)


def export_executorch(em, folder: Path, budgets, quantize, config) -> dict:
    """`export(..., format="executorch")`; 8da4w through the registered exporter directly
    while `flexrank.exporters.export` accepts only the ONNX quantizations."""
    if quantize is None:
        return export(em, folder, format="executorch", budgets=budgets, config=config)
    folder.mkdir(parents=True, exist_ok=True)
    body = EXPORTERS["executorch"](em, folder, layout="per-budget", budgets=budgets,
                                   quantize=quantize, config=config)
    write_manifest(folder, body)
    return load_manifest(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2, help="XNNPACK / onnxruntime threads")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--budgets", default="0.5,0.75,1")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (best of)")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false",
                        help="skip the onnxruntime comparison")
    parser.add_argument("--out", default=None, help="bundle folder (default: a temp folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.torch_threads)
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    out = Path(args.out or tempfile.mkdtemp(prefix="flexrank-bench-executorch-"))

    em = uniform_smollm2(args.samples, budgets)

    config = ExecutorchExportConfig(max_seq_len=args.max_seq_len)
    programs = []  # (result, path, runtime)
    for label, quantize in (("executorch", None), ("executorch-8da4w", "8da4w")):
        t = time.perf_counter()
        manifest = export_executorch(em, out / label, budgets, quantize, config)
        print(f"{label}: export + validation {time.perf_counter() - t:.0f} s", file=sys.stderr,
              flush=True)
        for entry in manifest["budgets"]:
            result = {"label": label, "beta": entry["beta"], "forms": entry["forms"],
                      "file_mb": (entry["program"]["bytes"]  # + model.ptd: a tied table's
                                  + entry["program"].get("data_bytes", 0)) / 1e6,
                      "prefill_ms": float("inf"), "decode_ms": float("inf"),
                      "validation": entry["validation"],
                      "quantized": len((entry["quantization"] or {}).get("quantized", []))}
            programs.append((result, out / label / entry["graph"], "executorch"))
    if args.onnx:
        t = time.perf_counter()
        manifest = export(em, out / "onnx", budgets=budgets)
        print(f"onnx: export + validation {time.perf_counter() - t:.0f} s", file=sys.stderr,
              flush=True)
        for entry in manifest["budgets"]:
            files = [f for f in entry["files"] if f.endswith((".onnx", ".onnx_data"))]
            result = {"label": "onnxruntime", "beta": entry["beta"], "forms": entry["forms"],
                      "file_mb": sum(manifest["files"][f]["bytes"] for f in files) / 1e6,
                      "prefill_ms": float("inf"), "decode_ms": float("inf"),
                      "validation": entry["validation"], "quantized": 0}
            programs.append((result, out / "onnx" / entry["graph"], "onnxruntime"))

    for round_index in range(args.rounds):
        for result, path, runtime in programs:
            if runtime == "executorch":
                prefill, decode = time_pte(path, args.decode_tokens)
            else:
                prefill, decode = time_alone(path, args.threads, args.decode_tokens)
            result["prefill_ms"] = min(result["prefill_ms"], 1e3 * prefill)
            result["decode_ms"] = min(result["decode_ms"], 1e3 * decode)
        print(f"timing round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    results = [r for r, _, _ in programs]
    dense = {label: next(r for r in results if r["label"] == label and r["beta"] == 1.0)
             for label in {r["label"] for r in results} if 1.0 in budgets}
    reference = dense.get("executorch")
    rows = ["| runtime / weights | β | forms | file MB | prefill ms (64) | prefill vs dense .pte "
            "| decode ms/token | decode vs dense .pte | max abs Δ logits | top-1 | greedy 20 = "
            "PyTorch |", "|" + "---|" * 11]

    def ratio(result, key):
        return f"{result[key] / reference[key]:.2f}" if reference else "-"

    for r in results:
        v = r["validation"] or {}
        forms = ", ".join(f"{k} {n}" for k, n in sorted(r["forms"].items()))
        rows.append(f"| {r['label']} | {r['beta']:g} | {forms} | {r['file_mb']:.1f} | "
                    f"{r['prefill_ms']:.1f} | {ratio(r, 'prefill_ms')} | {r['decode_ms']:.2f} | "
                    f"{ratio(r, 'decode_ms')} | {v.get('max_abs_diff', float('nan')):.2e} | "
                    f"{v.get('top1_agreement', float('nan')):.3f} | "
                    f"{v.get('generation_match')} |")
    print("\n".join(rows))
    (out / "bench_executorch.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {out / 'bench_executorch.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
