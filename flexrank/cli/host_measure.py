"""`flexrank-export`'s stage 4 in a fresh Python process, so that the peak memory reported
is the loaded bundle's and nothing else's.

In the process that exported the bundle, the compress and export stages have left the
allocator holding freed pages: onnxruntime's buffers land in them and the resident set
barely grows (SmolLM2-135M's 86 MB int4 graph measured "6 MiB" that way, 198 MiB in a
fresh process). The child measures an onnxruntime bundle with
`ElasticSession.measure` and a decoder `.pte` with `exporters.executorch.measure`
(ExecuTorch's runtime), and writes the figures to a file the parent reads.

    python -m flexrank.cli.host_measure REQUEST.json RESULT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE_TIMEOUT_S = 600  # a 2-core host loads and times SmolLM2 in ~5-15 s; this is a hang


class HostMeasureError(RuntimeError):
    """The measuring process failed or hung; carries the end of its output."""


def measure_in_child(bundle_dir, manifest, beta: float, threads: int | None,
                     prompt_tokens: int, new_tokens: int) -> dict:
    """Host figures of budget `beta` of the bundle in `bundle_dir`, measured in a new Python
    process: `ElasticSession(...).measure(prompt_tokens, new_tokens)` for onnxruntime
    bundles, `measure_pte` for ExecuTorch ones (a dict with "runtime", "ttft_s",
    "decode_ms_median", "peak_rss_mb", ... or an encoder's "latency_ms"). `manifest`: the
    in-memory Manifest of an export whose manifest file is not written yet, or None to read
    (and verify) the bundle's. Raises HostMeasureError when the child fails or hangs."""
    request = {"bundle_dir": str(bundle_dir), "beta": beta, "threads": threads,
               "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
               "manifest": None if manifest is None else manifest.to_dict()}
    with tempfile.TemporaryDirectory(prefix="flexrank-measure-") as tmp:
        asked, result = Path(tmp) / "request.json", Path(tmp) / "figures.json"
        asked.write_text(json.dumps(request))
        command = [sys.executable, "-m", "flexrank.cli.host_measure", str(asked), str(result)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False,
                                  timeout=MEASURE_TIMEOUT_S,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
        except subprocess.TimeoutExpired as err:
            raise HostMeasureError(f"measuring {bundle_dir} at β {beta:g} did not finish in "
                                   f"{MEASURE_TIMEOUT_S} s") from err
        try:
            return json.loads(result.read_text())
        except (OSError, ValueError):
            tail = (done.stderr or done.stdout or "")[-2000:]
            raise HostMeasureError(f"measuring {bundle_dir} at β {beta:g} in a child process "
                                   f"failed (exit {done.returncode}): {tail}") from None


def _main(request_path: str, result_path: str) -> None:
    from flexrank.manifest import Format, Manifest, budget_entry, load_manifest

    request = json.loads(Path(request_path).read_text())
    bundle = Path(request["bundle_dir"])
    given = request["manifest"]
    manifest = load_manifest(bundle) if given is None else Manifest.from_dict(given)
    if manifest.export_format == Format.EXECUTORCH:
        from flexrank.exporters.executorch.measure import measure_pte

        entry = budget_entry(manifest, request["beta"])
        figures = measure_pte(bundle / entry.graph, entry.beta, request["threads"],
                              request["prompt_tokens"], request["new_tokens"],
                              entry.max_seq_len)
    else:
        from flexrank.runtime.session import ElasticSession

        session = ElasticSession(bundle, budget=request["beta"], threads=request["threads"],
                                 manifest=manifest)
        figures = {"runtime": "onnxruntime",
                   **session.measure(prompt_tokens=request["prompt_tokens"],
                                     new_tokens=request["new_tokens"])}
    Path(result_path).write_text(json.dumps(figures))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
