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
    "Mutation on a buffer": "ExecuTorch's emitter on the KV cache's buffers",
    "cpuinfo_utils": "ExecuTorch's runtime reading ARM CPU files on first load",
}
ALWAYS_SEEN_WITH_V = ("TracerWarning", "Found different candidate ONNX initializers")


def export(checkpoint, out, *extra: str, fmt: str = "onnx") -> subprocess.CompletedProcess:
    code = "import sys; from flexrank.cli import export_main; sys.exit(export_main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, str(checkpoint), "--profile", "pixel8",
                           "--budget", "0.8", "--format", fmt, "-o", str(out), *extra],
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
    # FlexRank's own details (the graph simplifier's counts, the exporter's per-budget
    # check, which stage 3 prints as a line of its own) are -v's too
    for detail in ("graph simplified:", "β=0.8: max |Δ|"):
        assert detail not in text, detail
        assert detail in loud.stderr, detail


def test_executorch_export_output_is_clean_by_default(checkpoint, tmp_path):
    """The ExecuTorch path (8da4w: torchao, the emitter, the runtime's first load in the
    validation and in the host measurement) prints FlexRank's stages and nothing of the
    libraries'."""
    quiet = export(checkpoint, tmp_path / "quiet", "--precision", "8da4w", fmt="executorch")
    text = quiet.stdout + quiet.stderr
    assert not [line for line in text.splitlines() if any(c in line for c in CHATTER)], text
    assert "[5/5] manifest" in quiet.stdout


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


def test_first_gguf_conversion_is_quiet_by_default_and_shown_with_v(tmp_path):
    """The first run on a fresh machine converts SmolLM2's GGUF file: transformers' own
    progress bar and its tokenizer's 'legacy' notice are hidden by default (a real
    conversion, in a process of its own); with FlexRank at DEBUG (-v) nothing is patched,
    and the patch is undone afterwards."""
    import logging

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from flexrank.compress.aliases import DEFAULT_MODEL
    from flexrank.compress.models import _quiet_gguf_conversion, alias_path

    code = ("import logging, sys; from pathlib import Path; "
            "from flexrank.compress.models import _load_gguf; logging.basicConfig(); "
            "logging.getLogger('flexrank').setLevel(logging.INFO); _load_gguf(Path(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(alias_path(DEFAULT_MODEL))],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for needle in ("Converting and de-quantizing GGUF tensors", "legacy"):
        assert needle not in done.stderr, done.stderr[-3000:]
    assert "converting" in done.stderr  # FlexRank's own line says what the wait is

    bar, verbosity = gguf_utils.tqdm, hf_logging.get_verbosity()
    flexrank_logger = logging.getLogger("flexrank")
    level = flexrank_logger.level
    try:
        for debug in (False, True):
            flexrank_logger.setLevel(logging.DEBUG if debug else logging.INFO)
            with _quiet_gguf_conversion():
                assert (gguf_utils.tqdm is bar) == debug
                assert (hf_logging.get_verbosity() == hf_logging.ERROR) != debug or \
                    verbosity == hf_logging.ERROR
            assert gguf_utils.tqdm is bar and hf_logging.get_verbosity() == verbosity
    finally:
        flexrank_logger.setLevel(level)
