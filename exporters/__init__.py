"""flexrank.exporters: turn an `ElasticModel` into a deployable bundle.

    from flexrank.exporters import export, load_manifest
    manifest = export(elastic_model, "dist/", format="onnx", layout="per-budget")

An exporter is one function registered by name; adding a format is one decorated function:

    @register_exporter("myformat")
    def export_myformat(elastic, out_dir, *, layout, budgets, quantize, **options) -> Manifest:
        ...  # write the files into out_dir, then return Manifest.build(out_dir, ...)

A bundle is finished or absent. `export` checks every argument before it touches the disk,
takes a lock on `out_dir` (a second writer is refused), has the exporter write into a new
folder beside it, writes the manifest there last (each file hashed once, when the
exporter builds the manifest), and only then renames the folder into place, replacing an
older bundle as a whole. `out_dir` must be new, an empty folder or a FlexRank bundle:
nothing an export did not write is ever deleted.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flexrank.budget import match_budget
from flexrank.exporters.common.errors import (
    ExportValidationError,
    GenerationMismatchError,
    OutputMismatchError,
    OutputNamesError,
    ShapeError,
)
from flexrank.io import atomic_dir, recover_interrupted_write
from flexrank.manifest import (
    MANIFEST_FILE,
    BundleError,
    CorruptFileError,
    Deployment,
    Format,
    Layout,
    Manifest,
    MissingFileError,
    Quantization,
    load_manifest,
    write_manifest,
)

_EXPORTERS: dict[str, Callable[..., Manifest]] = {}
# The built-in formats register themselves when their module is imported; that module
# imports torch, so it is imported on first use, not with this package (the runtime reads
# manifests through flexrank.manifest without torch).
_BUILTIN_MODULES = ("flexrank.exporters.onnx.export", "flexrank.exporters.executorch.export")
# Weight quantization each format offers (onnxruntime dynamic int8 and weight-only int4;
# XNNPACK 8-bit dynamic activations with 4-bit grouped weights).
QUANTIZATIONS = {Format.ONNX: (Quantization.INT8, Quantization.INT4),
                 Format.ORT: (Quantization.INT8, Quantization.INT4),
                 Format.EXECUTORCH: (Quantization.DA8W4,)}
# Formats limited to some layouts, and why (the exporters check it again for direct calls).
FORMAT_LAYOUTS = {
    Format.ORT: ((Layout.PER_BUDGET, Layout.ELASTIC),
                 "the ORT format embeds the weights in each file, so budgets cannot share them"),
    Format.EXECUTORCH: ((Layout.PER_BUDGET,), "a .pte program embeds its weights"),
}


class BundleLockedError(BundleError):
    """Another export is writing the same bundle folder."""


def register_exporter(name: str):
    """Decorator: make `fn` the exporter for format `name`."""

    def wrap(fn):
        if name in _EXPORTERS:
            raise ValueError(f"an exporter for format {name!r} is already registered")
        _EXPORTERS[name] = fn
        return fn

    return wrap


def exporters() -> dict[str, Callable[..., Manifest]]:
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


def checked_options(format: str, layout: str, quantize: str | None = None,
                    ) -> tuple[str, Layout, Quantization | None]:
    """(format, layout, quantization) typed, if the format offers them together.

    `format` comes back a Format for the built-in exporters, the registered name for
    others; quantize None or "none" is None. Raises ValueError naming the bad value and the
    choices."""
    registry = exporters()
    if format not in registry:
        raise ValueError(f"unknown export format {format!r}; available: {sorted(registry)}")
    if format in Format._value2member_map_:
        format = Format(format)
    if layout not in Layout._value2member_map_:
        raise ValueError(f"unknown layout {layout!r}; choose one of "
                         f"{[str(choice) for choice in Layout]}")
    layout = Layout(layout)
    quantize = None if quantize in (None, "none") else quantize
    offered = QUANTIZATIONS.get(format, ())
    if quantize is not None and quantize not in offered:
        raise ValueError(f"quantization {quantize!r} is not available for format "
                         f"{str(format)!r}; choose one of {['none', *map(str, offered)]}")
    allowed, why = FORMAT_LAYOUTS.get(format, (tuple(Layout), ""))
    if layout not in allowed:
        raise ValueError(f"the {format} format has the {' and '.join(allowed)} layout"
                         f"{'s' * (len(allowed) > 1)} only (got {str(layout)!r}): {why}")
    # int4 blocks of a rank prefix are a prefix (exporters/onnx/int4_layouts.py); int8's
    # per-channel scales and 8da4w's groups are not laid out for it
    if quantize is not None and quantize != "int4" and layout != Layout.PER_BUDGET:
        raise ValueError(f"--quantize {quantize} works with the per-budget layout only: "
                         f"the {layout} layout shares float factor prefixes across budgets")
    return format, layout, None if quantize is None else Quantization(quantize)


@dataclass(frozen=True)
class ExportRequest:
    """What to export, checked against the registry and the plan (nothing on disk)."""

    format: str  # a registered exporter; a Format for the built-in ones
    layout: Layout
    budgets: tuple[float, ...]  # as the plan holds them, ascending
    quantize: Quantization | None

    @classmethod
    def checked(cls, elastic, format: str, layout: str, budgets=None,
                quantize: str | None = None) -> ExportRequest:
        """Raises ValueError naming the bad value and the choices (`checked_options`, and
        a budget that is not one of the plan's)."""
        format, layout, quantize = checked_options(format, layout, quantize)
        return cls(format, layout, tuple(resolve_budgets(elastic, budgets)), quantize)


def check_bundle_target(out_dir: str | os.PathLike) -> Path:
    """`out_dir` as an absolute path, if an export may write it: a new folder, an empty
    one, or a FlexRank bundle (replaced as a whole). ValueError for anything else."""
    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    if not out.name:
        raise ValueError(f"{out_dir} cannot be replaced by a bundle: choose a folder inside it")
    if not out.exists():
        return out
    if not out.is_dir():
        raise ValueError(f"{out} is a file, not a bundle folder: choose another output folder")
    if not any(out.iterdir()):
        return out
    try:
        manifest = load_manifest(out, verify=False)  # a bundle, even one since damaged
    except BundleError as err:
        raise ValueError(f"{out} is not empty and is not a FlexRank bundle ({err}); export "
                         "into a new or empty folder: an export replaces only a bundle") from None
    foreign = foreign_files(out, manifest)
    if foreign:
        raise ValueError(f"{out} is a FlexRank bundle but also holds {len(foreign)} file(s) no "
                         f"export or bench wrote (e.g. {', '.join(foreign[:3])}); an export "
                         "replaces the whole folder, so move them out or choose another folder")
    return out


# `flexrank bench` writes its results here, inside the bundle but outside the manifest
BENCH_FOLDER = "bench"


def foreign_files(out: Path, manifest) -> list[str]:
    """Files in bundle folder `out` that neither its manifest lists nor `flexrank bench`
    wrote (POSIX paths relative to `out`, sorted)."""
    ours = set(manifest.files) | {MANIFEST_FILE}
    return sorted(rel for rel in (p.relative_to(out).as_posix() for p in out.rglob("*")
                                  if p.is_file())
                  if rel not in ours and rel.split("/")[0] != BENCH_FOLDER)


def lock_file(out_dir: Path) -> Path:
    """The lock of bundle folder `out_dir`: a file beside it, since the folder itself is
    replaced by a rename."""
    return out_dir.with_name(f".{out_dir.name}.lock")


@contextmanager
def bundle_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of `out_dir` (re-entrant in one thread); BundleLockedError if another
    process or thread holds it."""
    from filelock import FileLock, Timeout

    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    path = lock_file(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0, is_singleton=True)
    try:
        lock.acquire()
    except Timeout:
        raise BundleLockedError(f"another export is writing {out} (it holds {path}): wait for "
                                "it to finish, or choose another output folder") from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def staged_bundle(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Lock `out_dir` and yield a new empty folder beside it to build the bundle in; on
    success it replaces `out_dir` as a whole, on an exception it is removed and `out_dir`
    is left as it was. ValueError if `out_dir` holds something other than a bundle."""
    out = check_bundle_target(out_dir)
    with bundle_lock(out):
        recover_interrupted_write(out)  # what a killed export left: no one else writes here
        out = check_bundle_target(out)  # again, now that no other export can write it
        with atomic_dir(out) as folder:
            yield folder


def qat_mismatch(qat: dict | None, quantize: str | None, config=None) -> str | None:
    """Why an export does not ship the weights a quantization-aware checkpoint was trained
    for, or None when it does (or the checkpoint is not QAT-trained).

    `qat`: the checkpoint's record (`ElasticModel.qat`, {"scheme": "int4" | "8da4w",
    "block_size": int}); `quantize`: the export's ("int4", "8da4w", "int8" or None);
    `config`: the exporter's config (OnnxExportConfig: int4_block_size, int4_algorithm;
    ExecutorchExportConfig: group_size), None for its defaults. QAT's fake quantization
    equals onnxruntime's RTN MatMulNBits and torchao's 8da4w at that block / group size
    (compress/qat.py), nothing else."""
    if not qat:
        return None
    scheme, block = qat.get("scheme"), qat.get("block_size")
    trained = f"trained for {scheme} weights in blocks of {block} (--qat {scheme})"
    if quantize != scheme:
        shipped = "float weights" if quantize is None else f"{quantize} weights"
        return (f"this checkpoint was {trained}, but the export ships {shipped}: "
                f"--quantize {scheme} ships what it was trained for")
    size = getattr(config, "int4_block_size" if scheme == "int4" else "group_size", 32)
    if size != block:
        fix = (f"--block-size {block}" if scheme == "int4"
               else f"ExecutorchExportConfig(group_size={block})")
        return (f"this checkpoint was {trained}, but the export quantizes in blocks of "
                f"{size}: {fix} ships what it was trained for")
    algorithm = getattr(config, "int4_algorithm", "rtn") if scheme == "int4" else "rtn"
    if algorithm != "rtn":
        return (f"this checkpoint was {trained} with round-to-nearest, but the export "
                f"quantizes with {algorithm}: --int4-algo rtn ships what it was trained for")
    return None


def export_files(elastic_model, folder: Path, request: ExportRequest, **options) -> Manifest:
    """Run the exporter of `request.format` into `folder`; its manifest, not yet written.
    Logs a warning when a quantization-aware checkpoint is exported with other weights
    than it was trained for (`qat_mismatch`)."""
    mismatch = qat_mismatch(getattr(elastic_model, "qat", None),
                            None if request.quantize is None else str(request.quantize),
                            options.get("config"))
    if mismatch:
        logging.getLogger(__name__).warning(mismatch)
    exporter = exporters()[request.format]
    manifest = exporter(elastic_model, folder, layout=str(request.layout),
                        budgets=list(request.budgets),
                        quantize=None if request.quantize is None else str(request.quantize),
                        **options)
    if not isinstance(manifest, Manifest):
        raise TypeError(f"the {request.format} exporter returned a {type(manifest).__name__}, "
                        "not a flexrank.manifest.Manifest (build it with Manifest.build)")
    return manifest


def export(elastic_model, out_dir: str | os.PathLike, format: str = Format.ONNX,
           layout: str = Layout.PER_BUDGET, budgets=None, quantize: str | None = None,
           deployment: Deployment | None = None, **options) -> Manifest:
    """Export `budgets` (None: all of the plan's) of `elastic_model` into `out_dir`.

    `options` go to the format's exporter (ONNX: `sample_inputs` for a plain nn.Module,
    `config=OnnxExportConfig(...)`); `deployment` (a budget decision and its figures) goes
    into the manifest. Returns the manifest as written. ValueError for a bad argument or
    an `out_dir` that holds something other than a bundle; BundleLockedError while another
    export writes `out_dir`.
    """
    request = ExportRequest.checked(elastic_model, format, layout, budgets, quantize)
    with staged_bundle(out_dir) as folder:
        manifest = export_files(elastic_model, folder, request, **options)
        manifest = manifest.with_deployment(deployment)
        write_manifest(folder, manifest)
    return manifest


__all__ = [
    "EXPORTERS",
    "MANIFEST_FILE",
    "BundleError",
    "BundleLockedError",
    "CorruptFileError",
    "Deployment",
    "ExportRequest",
    "ExportValidationError",
    "Format",
    "GenerationMismatchError",
    "Layout",
    "Manifest",
    "MissingFileError",
    "OutputMismatchError",
    "OutputNamesError",
    "Quantization",
    "ShapeError",
    "checked_options",
    "export",
    "exporters",
    "load_manifest",
    "register_exporter",
    "staged_bundle",
]
