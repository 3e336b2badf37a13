"""Issue 20 benchmark: peak RSS of a whole `flexrank compress` run on SmolLM2-135M, this
code against an earlier revision, same settings, one process each (RSS peaks are per
process), run one after the other.

    .venv/bin/python benchmarks/bench_compress_memory.py --before b8c762d^

The earlier revision's `flexrank/` is extracted with `git archive` into a temporary folder
that goes first on PYTHONPATH for its run. Settings: calibration on 64 x 256 tokens of the
first 80 % of tinyshakespeare (bench_quality.py's), 4 held-out sequences, fast probe
(4 levels, 1 measured rank, 1 probe sequence: the probe's peak is not what changed),
budgets 1 / 0.6, no distillation steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common import SHAKESPEARE, PeakRSS

ROOT = Path(__file__).resolve().parents[1]


def run_once(out: str) -> dict:
    import torch

    import flexrank
    from flexrank.compress.config import CompressConfig, DistillConfig, ProbeConfig
    from flexrank.compress.pipeline import compress

    torch.set_num_threads(2)
    # the full-vocabulary KL, as before top_k existed (and its default became 64)
    full_kl = {"top_k": 0} if "top_k" in ProbeConfig.__dataclass_fields__ else {}
    config = CompressConfig(calib=str(SHAKESPEARE), num_samples=64, seq_len=256,
                            eval_samples=4, batch_size=8, budgets=(1.0, 0.6),
                            probe=ProbeConfig(mode="fast", num_levels=4, probe_points=1,
                                              **full_kl),
                            probe_samples=1, distill=DistillConfig(steps=0))
    with PeakRSS() as rss:
        start = time.perf_counter()
        compress("smollm2-135m", out, config)
        seconds = time.perf_counter() - start
    state = json.loads((Path(out) / "flexrank-compress.json").read_text())
    return {"code": str(Path(flexrank.__file__).parent), "peak_rss_gb": rss.peak / 1e9,
            "seconds": seconds,
            "stages": {k: round(v["seconds"], 1) for k, v in state["done"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default=None, help="git revision to compare with")
    parser.add_argument("--once", default=None, help=argparse.SUPPRESS)  # child: output dir
    args = parser.parse_args()
    if args.once:
        print("RESULT " + json.dumps(run_once(args.once)), flush=True)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("after (this tree)", None)]
        if args.before:
            old = Path(tmp) / "before"
            old.mkdir()
            archive = Path(tmp) / "before.tar"
            subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive),
                            args.before, "flexrank"], check=True)
            with tarfile.open(archive) as tar:
                tar.extractall(old, filter="data")
            runs.insert(0, (f"before ({args.before})", old))
        for label, code in runs:
            env = dict(os.environ)
            if code is not None:
                env["PYTHONPATH"] = f"{code}{os.pathsep}{env.get('PYTHONPATH', '')}"
            out = Path(tmp) / f"out-{label.split()[0]}"  # not the code folder "before"
            done = subprocess.run([sys.executable, __file__, "--once", str(out)], env=env,
                                  capture_output=True, text=True, cwd=Path(__file__).parent)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode or not lines:
                raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
            results[label] = json.loads(lines[-1][len("RESULT "):])
    for label, result in results.items():
        print(f"{label}: peak RSS {result['peak_rss_gb']:.2f} GB, {result['seconds']:.0f} s, "
              f"code {result['code']}, stages {result['stages']}")


if __name__ == "__main__":
    main()
