"""A clean terminal (issue 17): a real `flexrank-export` process prints none of the
libraries' chatter at default verbosity, and -v shows it."""

from __future__ import annotations

import subprocess
import sys

# What tracing, importing torchao and optimum's tied-weight check print; each seen in the
# demo's output before it was kept out.
CHATTER = {
    "TracerWarning": "transformers' mask code, traced",
    "Found different candidate ONNX initializers": "optimum's tied-weight check",
    "torch/utils/_pytree.py": "torch's Enum registration deprecation (via torchao)",
    "torchao": "torchao's CUDA-kernel and triton notes",
}
ALWAYS_SEEN_WITH_V = ("TracerWarning", "Found different candidate ONNX initializers")


def export(checkpoint, out, *extra: str) -> subprocess.CompletedProcess:
    code = "import sys; from flexrank.cli import export_main; sys.exit(export_main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, str(checkpoint), "--profile", "pixel8",
                           "--budget", "0.8", "--format", "onnx", "-o", str(out), *extra],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_export_output_is_clean_by_default_and_verbose_with_v(checkpoint, tmp_path):
    quiet = export(checkpoint, tmp_path / "quiet")
    loud = export(checkpoint, tmp_path / "loud", "-v")
    text = quiet.stdout + quiet.stderr
    assert not [line for line in text.splitlines() if any(c in line for c in CHATTER)], text
    for needle in ALWAYS_SEEN_WITH_V:  # the filters are lifted by -v, not only hidden
        assert needle in loud.stderr, (needle, loud.stderr[-3000:])
    assert "[5/5] manifest" in quiet.stdout and "[5/5] manifest" in loud.stdout


def test_library_info_and_future_warnings_only_with_v():
    """What ExecuTorch's export path printed at default verbosity (transformers' INFO on the
    root logger, torch's pytree FutureWarning) stays out; FlexRank's own INFO stays in."""
    code = ("import logging, sys, warnings; from flexrank.cli import _setup_logging; "
            "_setup_logging(sys.argv[1] == 'verbose'); "
            "logging.getLogger().info('library info'); "
            "warnings.warn('isinstance(treespec, LeafSpec) is deprecated', FutureWarning); "
            "logging.getLogger('flexrank.compress').info('our info')")
    runs = {mode: subprocess.run([sys.executable, "-c", code, mode], capture_output=True,
                                 text=True, timeout=300) for mode in ("quiet", "verbose")}
    assert all(run.returncode == 0 for run in runs.values())
    assert "our info" in runs["quiet"].stderr and "our info" in runs["verbose"].stderr
    for needle in ("library info", "LeafSpec"):
        assert needle not in runs["quiet"].stderr and needle in runs["verbose"].stderr
