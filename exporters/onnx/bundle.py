"""Per-budget ONNX bundles read back as PyTorch-like decoders (optimum's
ORTModelForCausalLM), so that the exported files themselves are scored."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from flexrank.budget import same_budget
from flexrank.compress.evaluate import EvaluationError


def bundle_decoders(bundle_dir, budgets: Sequence[float] | None = None) -> dict[float, nn.Module]:
    """{β: onnxruntime decoder} of a per-budget ONNX bundle, through optimum's
    ORTModelForCausalLM (so the exported files themselves are scored)."""
    from pathlib import Path

    from optimum.onnxruntime import ORTModelForCausalLM

    from flexrank.manifest import Format, Layout, load_manifest

    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    if manifest.kind != "decoder":
        raise EvaluationError(f"{bundle_dir} holds a {manifest.kind} export, not a "
                              "decoder: perplexity needs a language model bundle")
    if manifest.layout != Layout.PER_BUDGET or manifest.export_format != Format.ONNX:
        raise EvaluationError(f"{bundle_dir} is a {manifest.layout} "
                              f"{manifest.export_format} bundle; `flexrank eval` scores "
                              "per-budget ONNX bundles (export with --layout per-budget)")
    models = {}
    for entry in manifest.budgets:
        if budgets is not None and not any(same_budget(entry.beta, b) for b in budgets):
            continue
        folder = (bundle_dir / entry.graph).parent
        models[entry.beta] = ORTModelForCausalLM.from_pretrained(
            folder, local_files_only=True, use_cache=False, use_io_binding=False)
    if not models:
        raise EvaluationError(f"none of the budgets {budgets} is in {bundle_dir}")
    return models
