"""Time the README's main job (`make demo`) stage by stage:

    flexrank-export --profile pixel8 --budget auto -o DIST
    flexrank bench DIST --profiles pixel8,laptop-x86,server-x86

Runs both as the user would (subprocesses of the installed console scripts), with a fresh
compress work folder unless --reuse, and records the wall time of each command, the
export's own stage lines (`[i/n] name: X s`) and compress's stage times (its state file).

    .venv/bin/python benchmarks/bench_demo.py --out results/demo.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGE_LINE = re.compile(r"^\[(\d+)/(\d+)\] (.+): ([0-9.]+) s")
BIN = Path(sys.executable).parent


def run(cmd: list[str]) -> tuple[float, str]:
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # echo live: the demo's progress is part of what is checked
        sys.stdout.write(line)
        lines.append(line)
    if proc.wait() != 0:
        raise SystemExit(f"{cmd[0]} exited with {proc.returncode}")
    return time.perf_counter() - started, "".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--profile", default="pixel8")
    parser.add_argument("--tiers", default="pixel8,laptop-x86,server-x86")
    parser.add_argument("--work-dir", help="compress cache (default: a fresh temporary folder)")
    parser.add_argument("--out", default="demo-timings.json")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="flexrank-demo-"))
    work = Path(args.work_dir) if args.work_dir else scratch / "work"
    dist = scratch / "dist"
    try:
        export_s, log = run([str(BIN / "flexrank-export"), args.model, "--profile", args.profile,
                             "--budget", "auto", "-o", str(dist), "--work-dir", str(work)])
        stages = {m.group(3): float(m.group(4))
                  for m in map(STAGE_LINE.match, log.splitlines()) if m}
        state = work / "flexrank-compress.json"
        compress = ({k: v["seconds"] for k, v in json.loads(state.read_text())["done"].items()}
                    if state.is_file() else {})
        bench_s, _ = run([str(BIN / "flexrank"), "bench", str(dist), "--profiles", args.tiers])
        manifest = json.loads((dist / "flexrank-manifest.json").read_text())
        result = {"model": args.model, "profile": args.profile, "tiers": args.tiers,
                  "export_s": export_s, "bench_s": bench_s, "total_s": export_s + bench_s,
                  "export_stages_s": stages, "compress_stages_s": compress,
                  "chosen_beta": manifest["deployment"]["chosen_beta"],
                  "host_latency": manifest.get("host_latency")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
