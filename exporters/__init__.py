"""flexrank.exporters: turn an `ElasticModel` into a deployable bundle.

    from flexrank.exporters import export, load_manifest
    manifest = export(elastic_model, "dist/", format="onnx", layout="per-budget")

An exporter is one function registered by name; adding a format is one decorated function:

    @register_exporter("myformat")
    def export_myformat(elastic, out_dir, *, layout, budgets, quantize, **options) -> dict:
        ...  # write the files, return the manifest body (see manifest.py)

`export` then writes `flexrank-manifest.json` last and atomically (file sha256s included):
a bundle without a manifest is not finished.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

from flexrank.budget import match_budget
from flexrank.exporters.common.errors import (
    ExportValidationError,
    GenerationMismatchError,
    OutputMismatchError,
    OutputNamesError,
    ShapeError,
)
from flexrank.manifest import (
    MANIFEST_FILE,
    BundleError,
    CorruptFileError,
    MissingFileError,
    load_manifest,
    write_manifest,
)

_EXPORTERS: dict[str, Callable[..., dict]] = {}
# The built-in formats register themselves when their module is imported; that module
# imports torch, so it is imported on first use, not with this package (the runtime reads
# manifests through flexrank.manifest without torch).
_BUILTIN_MODULES = ("flexrank.exporters.onnx.export", "flexrank.exporters.executorch.export")
LAYOUTS = ("per-budget", "shared", "elastic")
# Weight quantization each format offers (onnxruntime dynamic int8; XNNPACK 8-bit dynamic
# activations with 4-bit grouped weights).
QUANTIZATIONS = {"onnx": ("int8",), "ort": ("int8",), "executorch": ("8da4w",)}


def register_exporter(name: str):
    """Decorator: make `fn` the exporter for format `name`."""

    def wrap(fn):
        if name in _EXPORTERS:
            raise ValueError(f"an exporter for format {name!r} is already registered")
        _EXPORTERS[name] = fn
        return fn

    return wrap


def exporters() -> dict[str, Callable[..., dict]]:
    """{format name: exporter function}, the built-in formats loaded."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return _EXPORTERS


def __getattr__(name: str):
    if name == "EXPORTERS":  # the registry, loaded on first access
        return exporters()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_budgets(elastic, budgets) -> list[float]:
    if budgets is None:
        return sorted(elastic.budgets)
    if isinstance(budgets, (int, float)):
        budgets = [budgets]
    return sorted({match_budget(beta, elastic.budgets) for beta in budgets})


def export(elastic_model, out_dir: str | os.PathLike, format: str = "onnx",
           layout: str = "per-budget", budgets=None, quantize: str | None = None,
           **options) -> dict:
    """Export `budgets` (None: all of the plan's) of `elastic_model` into `out_dir`.

    `options` go to the format's exporter (ONNX: `sample_inputs` for a plain nn.Module,
    `config=OnnxExportConfig(...)`). Returns the manifest as a dict.
    """
    registry = exporters()
    if format not in registry:
        raise ValueError(f"unknown export format {format!r}; available: {sorted(registry)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
    quantize = None if quantize in (None, "none") else quantize
    offered = QUANTIZATIONS.get(format, ())
    if quantize is not None and quantize not in offered:
        raise ValueError(f"quantization {quantize!r} is not available for format {format!r}; "
                         f"choose one of {['none', *offered]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # unfinished until written again
    body = registry[format](elastic_model, out_dir, layout=layout,
                             budgets=resolve_budgets(elastic_model, budgets),
                             quantize=quantize, **options)
    write_manifest(out_dir, body)
    return load_manifest(out_dir)


__all__ = [
    "EXPORTERS",
    "BundleError",
    "CorruptFileError",
    "ExportValidationError",
    "GenerationMismatchError",
    "MissingFileError",
    "OutputMismatchError",
    "OutputNamesError",
    "ShapeError",
    "export",
    "exporters",
    "load_manifest",
    "register_exporter",
]
