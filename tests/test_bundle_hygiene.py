"""Bundle hygiene (issue 17): every file of a real bundle, bench/ included, is readable by
others; the tokenizer ships as tokenizer.json alone; the host measurement's peak memory
is the loaded bundle's (measured in a fresh process), not the exporting process's."""

from __future__ import annotations

import os
import stat

import numpy as np
import psutil

from flexrank.cli import main


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


def test_the_measured_peak_memory_is_the_bundles(checkpoint, tmp_path):
    """flexrank-export's stage 4 measures in a fresh process: while the exporting process
    holds 600 MiB (as a compress run before the export does), the figure is the bundle's,
    far below that, and at least what onnxruntime holds for the graph's weights."""
    from flexrank.cli.host_measure import measure_in_child
    from flexrank.compress.elastic import ElasticModel
    from flexrank.exporters import export

    export(ElasticModel.from_pretrained(checkpoint), tmp_path / "dist", budgets=[0.8])
    ballast = np.ones(600 * 2**20, np.uint8)  # touched: resident, and kept
    assert psutil.Process().memory_info().rss > 600 * 2**20
    figures = measure_in_child(tmp_path / "dist", None, 0.8, 2, 8, 4)
    graph_mb = (tmp_path / "dist" / "budget-0.8" / "model.onnx").stat().st_size / 2**20
    assert graph_mb <= figures["peak_rss_mb"] < 300, (figures, graph_mb)
    assert figures["runtime"] == "onnxruntime" and ballast[-1] == 1


def test_a_failed_host_measurement_still_ships_the_validated_bundle(checkpoint, tmp_path,
                                                                    monkeypatch, caplog):
    """Stage 4's child failing (a crash, a hang past its timeout) costs the host figures,
    with a warning naming why, not the export before it."""
    import flexrank.cli.host_measure as host_measure
    from flexrank.manifest import load_manifest

    def crash(*args, **kwargs):
        raise host_measure.HostMeasureError("measuring dist at β 0.8 failed (exit -9): Killed")

    monkeypatch.setattr(host_measure, "measure_in_child", crash)
    dist = tmp_path / "dist"
    assert main(["export", str(checkpoint), "--budget", "0.8", "--format", "onnx",
                 "-o", str(dist)]) == 0
    manifest = load_manifest(dist)  # finished and verified: every file's sha256
    assert manifest["host_latency"] is None and manifest.betas == [0.8]
    assert any("host measurement skipped" in r.getMessage() and "Killed" in r.getMessage()
               for r in caplog.records)
