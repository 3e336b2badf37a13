"""Host figures of one budget measured in a fresh Python process, so that the peak memory
reported is the loaded bundle's and nothing else's.

In the process that exported the bundle, the compress and export stages have left the
allocator holding freed pages: onnxruntime's buffers land in them and the resident set
barely grows (SmolLM2-135M's 86 MB int4 graph measured "6 MiB" that way). A child that
imports only the runtime measures what an app's process would hold:
`ElasticSession.peak_rss_bytes` there is the peak since loading began, less the resident
memory just before (the interpreter and onnxruntime's libraries).

    python -m flexrank.runtime.host_measure REQUEST.json   # prints the figures as JSON
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE_TIMEOUT_S = 600  # a 2-core host loads and times SmolLM2 in ~5 s; this is a hang


class HostMeasureError(RuntimeError):
    """The measuring process failed; carries the end of its output."""


def measure_in_child(bundle_dir, manifest, beta: float, threads: int | None,
                     prompt_tokens: int, new_tokens: int) -> dict:
    """`ElasticSession(bundle_dir, beta, threads, manifest=manifest).measure(prompt_tokens,
    new_tokens)` run in a new Python process; returns its figures (dict, as `measure`).
    `manifest`: the in-memory Manifest of an export whose manifest file is not written
    yet, or None to read the bundle's. Raises HostMeasureError when the child fails."""
    request = {"bundle_dir": str(bundle_dir), "beta": beta, "threads": threads,
               "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
               "manifest": None if manifest is None else manifest.to_dict()}
    with tempfile.TemporaryDirectory(prefix="flexrank-measure-") as tmp:
        path = Path(tmp) / "request.json"
        path.write_text(json.dumps(request))
        done = subprocess.run([sys.executable, "-m", "flexrank.runtime.host_measure", str(path)],
                              capture_output=True, text=True, timeout=MEASURE_TIMEOUT_S,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-2000:]
        raise HostMeasureError(f"measuring {bundle_dir} at β {beta:g} in a child process "
                               f"failed (exit {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main(request_path: str) -> None:
    from flexrank.manifest import Manifest
    from flexrank.runtime.session import ElasticSession

    request = json.loads(Path(request_path).read_text())
    manifest = request["manifest"]
    session = ElasticSession(request["bundle_dir"], budget=request["beta"],
                             threads=request["threads"],
                             manifest=None if manifest is None else Manifest.from_dict(manifest))
    figures = session.measure(prompt_tokens=request["prompt_tokens"],
                              new_tokens=request["new_tokens"])
    print(json.dumps(figures))


if __name__ == "__main__":
    _main(sys.argv[1])
