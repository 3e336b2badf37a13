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
import time
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


def measure_pte(path: Path, threads: int | None, prompt_tokens: int, new_tokens: int) -> dict:
    """Host figures of a FlexRank decoder `.pte` in ExecuTorch's runtime (XNNPACK), as
    `ElasticSession.measure` gives them for onnxruntime: TTFT of a `prompt_tokens` prompt
    (prefill + the first greedy token, seconds), then `new_tokens` decode steps of one
    token through the program's KV cache (ms/token, median and p90), load time and the peak
    resident memory since the load began less the memory before it (MiB). `threads`: the
    runtime's threadpool size (None: ExecuTorch's default, one per core). The program's
    signature is the exporter's: forward(input_ids (1, T), cache_position (T,)) -> logits
    (1, T, V); prompt + new tokens must fit its `get_max_seq_len`."""
    import statistics

    import numpy as np
    import torch
    from executorch.extension.pybindings import portable_lib

    from flexrank.exporters.executorch.validate import constant_methods, load_method
    from flexrank.runtime.session import _reset_peak_rss, _status_kib

    if threads:
        portable_lib._unsafe_reset_threadpool(int(threads))
    rss_before = _status_kib("VmRSS")
    window = _reset_peak_rss() and rss_before is not None
    started = time.perf_counter()
    forward = load_method(path)
    load_s = time.perf_counter() - started
    max_len = int(constant_methods(path).get("get_max_seq_len", prompt_tokens + new_tokens))
    prompt_tokens = min(prompt_tokens, max_len - new_tokens - 1)  # within the static cache
    vocab_low = 3  # the usual special ids skipped, as ElasticSession.measure does
    prompt = torch.tensor((np.arange(prompt_tokens) % 97 + vocab_low)[None], dtype=torch.long)
    started = time.perf_counter()
    logits = forward.execute([prompt, torch.arange(prompt_tokens)])[0]
    token = logits[:, -1].argmax(-1, keepdim=True)
    ttft_s = time.perf_counter() - started
    decode_ms = []
    for step in range(new_tokens):
        started = time.perf_counter()
        logits = forward.execute([token, torch.tensor([prompt_tokens + step])])[0]
        token = logits[:, -1].argmax(-1, keepdim=True)
        decode_ms.append((time.perf_counter() - started) * 1e3)
    peak = _status_kib("VmHWM") if window else None
    peak_mb = (peak - rss_before) / 2**20 if peak and peak > rss_before else float("nan")
    median = statistics.median(decode_ms)
    return {"label": "measured on host in ExecuTorch (XNNPACK)", "runtime": "executorch",
            "threads": portable_lib._threadpool_get_thread_count(),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "ttft_s": ttft_s,
            "decode_ms_median": median, "decode_ms_p90": float(np.percentile(decode_ms, 90)),
            "decode_tokens_per_s": 1e3 / median, "load_s": load_s, "peak_rss_mb": peak_mb}


def _main(request_path: str) -> None:
    from flexrank.manifest import Format, Manifest, budget_entry, load_manifest
    from flexrank.runtime.session import ElasticSession

    request = json.loads(Path(request_path).read_text())
    bundle = Path(request["bundle_dir"])
    manifest = (load_manifest(bundle) if request["manifest"] is None
                else Manifest.from_dict(request["manifest"]))
    if manifest.export_format == Format.EXECUTORCH:
        entry = budget_entry(manifest, request["beta"])
        figures = measure_pte(bundle / entry.graph, request["threads"],
                              request["prompt_tokens"], request["new_tokens"])
    else:
        session = ElasticSession(bundle, budget=request["beta"], threads=request["threads"],
                                 manifest=manifest if request["manifest"] is not None else None)
        figures = session.measure(prompt_tokens=request["prompt_tokens"],
                                  new_tokens=request["new_tokens"])
    print(json.dumps(figures))


if __name__ == "__main__":
    _main(sys.argv[1])
