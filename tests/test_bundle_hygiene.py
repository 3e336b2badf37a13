"""Bundle hygiene (issue 17): every file of a real bundle, bench/ included, is readable by
others; the tokenizer ships as tokenizer.json alone; the host measurement's peak memory
is the loaded session's, not the process's lifetime peak."""

from __future__ import annotations

import os
import stat

import numpy as np
import psutil

from flexrank.cli import main
from flexrank.runtime.session import ElasticSession, peak_rss_bytes


def test_every_bundle_file_is_readable_by_others(checkpoint, tmp_path, capsys):
    previous = os.umask(0o022)  # the usual umask; the temp-file writer used to give 0600
    try:
        dist = tmp_path / "dist"
        assert main(["export", str(checkpoint), "--profile", "pixel8", "--budget", "0.8",
                     "--format", "onnx", "-o", str(dist)]) == 0
        assert main(["bench", str(dist), "--profiles", "pixel8"]) == 0
    finally:
        os.umask(previous)
    paths = [p for p in dist.rglob("*")]
    assert {p.relative_to(dist).as_posix() for p in paths} >= {
        "flexrank-manifest.json", "bench/bench.json", "budget-0.8/model.onnx",
        "budget-0.8/tokenizer.json"}
    modes = {p.relative_to(dist).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert {name: m for name, m in modes.items() if m not in (0o644, 0o755)} == {}
    assert stat.S_IMODE(dist.stat().st_mode) == 0o755
    assert not [p for p in paths if p.name == "tokenizer.model"]


def test_the_measured_peak_memory_is_the_sessions(checkpoint, tmp_path):
    """A process that held 600 MiB before loading a 0.2 MiB bundle used to report that
    peak; the session's figure is its own: at least what loading and running it added to
    the process's resident memory (psutil, independently), and far below the 600 MiB."""
    from flexrank.compress.elastic import ElasticModel
    from flexrank.exporters import export

    export(ElasticModel.from_pretrained(checkpoint), tmp_path / "dist", budgets=[0.8])
    ballast = np.ones(600 * 2**20, np.uint8)  # touched: resident
    del ballast
    assert peak_rss_bytes() > 600 * 2**20
    rss_before = psutil.Process().memory_info().rss
    session = ElasticSession(tmp_path / "dist")
    figures = session.measure(prompt_tokens=8, new_tokens=4)
    added = psutil.Process().memory_info().rss - rss_before
    assert added / 2**20 - 1 <= figures["peak_rss_mb"] < 300, (figures, added / 2**20)
