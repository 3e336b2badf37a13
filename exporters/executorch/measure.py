"""Host figures of a FlexRank decoder `.pte` in ExecuTorch's runtime (XNNPACK), as
`ElasticSession.measure` gives them for onnxruntime bundles (`flexrank-export`'s stage 4
runs this in a fresh process: `flexrank.cli.host_measure`)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from flexrank.exporters.executorch.validate import constant_methods, load_method
from flexrank.runtime.session import peak_rss_bytes, reset_peak_rss, status_bytes, timing_prompt


def measure_pte(path: Path, beta: float, threads: int | None, prompt_tokens: int,
                new_tokens: int, max_seq_len: int | None = None) -> dict:
    """TTFT of a `prompt_tokens` prompt (prefill + the first greedy token, s), then
    `new_tokens` decode steps of one token through the program's KV cache (ms/token,
    median and p90), load time (s) and peak resident memory (MiB: the peak since the load
    began less the memory before it; the process's lifetime peak where Linux's VmHWM
    cannot be reset). A warm-up prefill and step run before the timed ones, as
    `ElasticSession.measure` does.

    Call it in a fresh process (`flexrank.cli.host_measure.measure_in_child`): it replaces
    ExecuTorch's process-wide threadpool by one of `threads` (None: the runtime's default,
    one per core), which methods loaded earlier would not use, and its memory figure is
    the process's. The program's signature is the exporter's: forward(input_ids (1, T),
    cache_position (T,)) -> logits (1, T, V). `max_seq_len`: the static cache's positions
    as the manifest records them (None: read from the program's `get_max_seq_len`, one
    more load of the file). Raises ValueError when the cache leaves no room for a prompt
    before the decode steps."""
    from executorch.extension.pybindings import portable_lib

    max_len = int(max_seq_len or constant_methods(path)["get_max_seq_len"])
    prompt_tokens = min(prompt_tokens, max_len - new_tokens - 1)  # within the static cache
    if prompt_tokens < 1:
        raise ValueError(f"{path}: its KV cache holds {max_len} positions, which leaves no "
                         f"room for a prompt before {new_tokens} decode steps; export it "
                         f"with a max_seq_len above {new_tokens + 1}")
    if threads:
        portable_lib._unsafe_reset_threadpool(int(threads))
    rss_before = status_bytes("VmRSS")
    window = reset_peak_rss() and rss_before is not None
    started = time.perf_counter()
    forward = load_method(path)
    load_s = time.perf_counter() - started
    prompt = torch.from_numpy(timing_prompt(prompt_tokens))[None]  # (1, T) int64

    def step(tokens: torch.Tensor, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + tokens.shape[1])
        return forward.execute([tokens, positions])[0][:, -1].argmax(-1, keepdim=True)

    step(step(prompt[:, :8], 0), 8)  # warm-up: first-run costs, both shapes
    started = time.perf_counter()
    token = step(prompt, 0)  # the cache is rewritten from position 0
    ttft_s = time.perf_counter() - started
    decode_ms = []
    for index in range(new_tokens):
        started = time.perf_counter()
        token = step(token, prompt_tokens + index)
        decode_ms.append((time.perf_counter() - started) * 1e3)
    peak = status_bytes("VmHWM") if window else None
    peak = peak - rss_before if peak is not None and peak > rss_before else peak_rss_bytes()
    median = statistics.median(decode_ms)
    return {"label": "measured on host", "runtime": "executorch", "beta": beta,
            "threads": portable_lib._threadpool_get_thread_count(),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "ttft_s": ttft_s,
            "decode_ms_median": median, "decode_ms_p90": float(np.percentile(decode_ms, 90)),
            "decode_tokens_per_s": 1e3 / median, "load_s": load_s,
            "peak_rss_mb": peak / 2**20}
