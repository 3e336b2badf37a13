"""Shared helpers for benchmark scripts: the held-out text split, RSS sampling, timing."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
CALIBRATION_SPAN = (0.0, 0.8)  # first 80 % of tokens
HELDOUT_SPAN = (0.9, 1.0)  # last 10 %


class PeakRSS:
    """Samples this process's resident set size in a thread; `.peak` in bytes."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, psutil.Process().memory_info().rss)


@contextmanager
def stage(results: dict, name: str):
    """Record wall seconds and peak RSS (GB) of a block under results[name]."""
    start = time.perf_counter()
    with PeakRSS() as rss:
        yield
    results[name] = {"seconds": time.perf_counter() - start, "peak_rss_gb": rss.peak / 1e9}
