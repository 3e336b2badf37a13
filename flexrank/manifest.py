"""`flexrank-manifest.json`: what a bundle holds, with a sha256 per file.

One typed, versioned object, `Manifest`, built once by the exporter (each file hashed
once, `Manifest.build`) and written once, last, by `write_manifest`: a bundle folder
without one is an unfinished export. `load_manifest` parses the JSON back into a
`Manifest` and, with `verify`, checks every listed file, raising a `BundleError` naming
the first one that is missing or does not match its hash.

The JSON keys are the dataclass fields (plus `format`/`format_version`, and the
deployment spread over `deployment`, `budget_costs`, `profiles`, `predicted_device_latency`
and `host_latency`). Readers use attributes (`manifest.budgets[0].graph`); the objects
also read like the JSON (`manifest["budgets"][0]["graph"]`) for code written against it.

The exporter options a manifest records are str-Enums defined here, once: `Format`,
`Layout`, `Quantization` (the CLI's choices and `flexrank.exporters.export` use them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any

# Hashing has one home, flexrank.io.sha256_file, called through the module so that a test
# can count the calls (each bundle file is hashed once per export).
from flexrank import io as flexrank_io
from flexrank.budget import match_budget

MANIFEST_FILE = "flexrank-manifest.json"
FORMAT = "flexrank-bundle"
FORMAT_VERSION = 1
TOOLS = ("flexrank", "torch", "transformers", "onnx", "onnxruntime", "optimum", "optimum-onnx")


class Format(StrEnum):
    """The built-in export formats (`flexrank.exporters.register_exporter` may add more)."""

    ONNX = "onnx"
    ORT = "ort"  # onnxruntime's mobile format, converted from the ONNX graph
    EXECUTORCH = "executorch"


class Layout(StrEnum):
    """How a bundle stores its budgets (DESIGN.md §5)."""

    PER_BUDGET = "per-budget"  # one self-contained graph per budget
    SHARED = "shared"  # one graph per budget over shared weights
    ELASTIC = "elastic"  # one graph, the budget chosen by an input


class Quantization(StrEnum):
    """Weight quantization: onnxruntime dynamic int8; onnxruntime weight-only block-wise
    4-bit (MatMulNBits); XNNPACK 8-bit dynamic activations with 4-bit grouped weights."""

    INT8 = "int8"
    INT4 = "int4"
    DA8W4 = "8da4w"


class BundleError(ValueError):
    """A bundle that cannot be used as it is."""


class MissingFileError(BundleError, FileNotFoundError):
    pass


class CorruptFileError(BundleError):
    pass


def tool_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def json_ready(value):
    """`value` as JSON reads it back (tuples become lists, keys strings), so that an
    object built in memory equals the one `load_manifest` parses."""
    return json.loads(json.dumps(value))


class _ReadsLikeJson(Mapping):
    """Read-only access by JSON key, for code written against the JSON; new code reads
    attributes. A field that is absent from the JSON (None) still reads as None. Equal to
    another object of its type with equal fields, or to the JSON object it writes."""

    def _json_items(self) -> dict[str, Any]:
        """{JSON key: value}, values typed (BudgetEntry, FileEntry) where they have a type."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def __eq__(self, other) -> bool:
        if type(other) is type(self):
            return all(getattr(self, f.name) == getattr(other, f.name)
                       for f in dataclasses.fields(self))
        if isinstance(other, Mapping):
            other = other.to_dict() if isinstance(other, _ReadsLikeJson) else dict(other)
            return self.to_dict() == other
        return NotImplemented

    __hash__ = None  # holds dicts

    def __getitem__(self, key: str):
        items = self._json_items()
        if key in items:
            return items[key]
        if key in {f.name for f in dataclasses.fields(self)}:
            return getattr(self, key)
        raise KeyError(key)

    def __contains__(self, key) -> bool:
        return key in self._json_items()

    def __iter__(self) -> Iterator[str]:
        return iter(self._json_items())

    def __len__(self) -> int:
        return len(self._json_items())


def _checked_fields(cls, data: dict, where: str) -> dict:
    """`data`'s fields of `cls`; BundleError naming `where` for a missing or unknown one."""
    if not isinstance(data, dict):
        raise BundleError(f"{where}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing, unknown = sorted(required - set(data)), sorted(set(data) - names)
    if missing or unknown:
        raise BundleError(f"{where}: " + "; ".join(
            part for part in (missing and f"missing {missing}", unknown and f"unknown {unknown}")
            if part) + " (written by another flexrank version? re-export the bundle)")
    return dict(data)


def _without_none(items: dict[str, Any], optional: Iterable[str]) -> dict[str, Any]:
    optional = set(optional)
    return {k: v for k, v in items.items() if not (k in optional and v is None)}


@dataclass(frozen=True, eq=False)
class FileEntry(_ReadsLikeJson):
    """One file of the bundle, as hashed when the bundle was built."""

    bytes: int
    sha256: str

    def _json_items(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha256}

    def to_dict(self) -> dict:
        return self._json_items()

    @classmethod
    def of(cls, path: Path) -> FileEntry:
        return cls(path.stat().st_size, flexrank_io.sha256_file(path))


@dataclass(frozen=True, eq=False)
class BudgetEntry(_ReadsLikeJson):
    """One budget of a bundle. Fields after `graph` are written only when set."""

    beta: float
    files: list[str]  # POSIX paths relative to the bundle folder
    bytes: int  # of `files` together
    params: dict  # factorised, factorised_dense, kept (= β, of kept_of), other, whole_model*
    # {layer form: count}; a joint plan's stand-in layer is "shared" (the donor's weights
    # plus its adapter: `params` counts the adapter and output scale; a replaced block's
    # own layers are not listed), flexrank.compress.depth_layers.deployed_depth
    forms: dict
    ranks: dict  # {layer: rank} of the layers deployed (a stand-in layer: its adapter rank)
    layers: list  # per layer: name, shape, rank, form, condition, params
    validation: dict | None  # against PyTorch (None: exported without validation)
    graph: str  # the file a runtime loads
    rank_level: int | None = None  # elastic layout: the graph's rank_level input
    kv_cache_in_place: bool | None = None  # decoders: may bind each cache to one buffer
    int8_float_layers: dict | None = None  # int8: layers kept in float (input outlier ratio)
    int8_float_matmuls: list | None = None
    form_fallbacks: list | None = None  # form policies that failed validation first
    # executorch
    program: dict | None = None  # segment layout of the .pte
    dynamic_axes: dict | None = None
    quantization: dict | None = None  # 8da4w: the quantized layers
    max_seq_len: int | None = None
    plan_ranks: dict | None = None  # the plan's ranks before alignment to the group size

    def _json_items(self) -> dict[str, Any]:
        items = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _without_none(items, _OPTIONAL_ENTRY_FIELDS)

    def to_dict(self) -> dict:
        return json_ready(self._json_items())

    @classmethod
    def from_dict(cls, data: dict, where: str = "budget entry") -> BudgetEntry:
        return cls(**_checked_fields(cls, data, where))


_OPTIONAL_ENTRY_FIELDS = [f.name for f in dataclasses.fields(BudgetEntry)
                          if f.default is not dataclasses.MISSING]


@dataclass(frozen=True)
class Deployment:
    """What `flexrank-export` decided for a device profile and measured on this host,
    written into the manifest with the files (JSON: `deployment` holds the first four
    fields; the others are top-level keys)."""

    chosen_beta: float  # the runtime's default budget
    budget_request: str  # "auto", "all" or the β asked for
    profile: str | None = None
    threads: int | None = None  # the profile's thread count (ElasticSession's default)
    budget_costs: list = field(default_factory=list)  # flexrank.planning.costs.BudgetCost dicts
    profiles: dict = field(default_factory=dict)  # {profile: decision table, predicted}
    predicted_device_latency: dict | None = None  # flexrank.device.predict, not measured
    host_latency: dict | None = None  # measured on this host in the bundle's runtime

    def __post_init__(self):
        # stored as JSON reads it back, so that a manifest in memory equals the one loaded
        for name in ("budget_costs", "profiles", "predicted_device_latency", "host_latency"):
            object.__setattr__(self, name, json_ready(getattr(self, name)))

    def decision(self) -> dict:
        return {"profile": self.profile, "budget_request": self.budget_request,
                "chosen_beta": self.chosen_beta, "threads": self.threads}


@dataclass(frozen=True, eq=False)
class Manifest(_ReadsLikeJson):
    """What a bundle holds (see the module docstring for the JSON)."""

    model_id: str
    kind: str  # decoder, encoder or module
    export_format: str  # a Format value for the built-in exporters
    layout: Layout
    quantize: str | None  # a Quantization value
    budgets: tuple[BudgetEntry, ...]
    files: dict[str, FileEntry]  # every file of every budget, with its hash
    versions: dict[str, str | None]  # the tools that wrote the bundle
    deployment: Deployment | None = None  # flexrank-export's decision (None: API export)
    executorch: dict | None = None  # executorch: backend and tool versions

    def __post_init__(self):
        export_format = self.export_format
        if export_format in Format._value2member_map_:
            export_format = Format(export_format)
        object.__setattr__(self, "export_format", export_format)
        object.__setattr__(self, "layout", Layout(self.layout))
        if self.quantize is not None:
            object.__setattr__(self, "quantize", Quantization(self.quantize))
        object.__setattr__(self, "budgets", tuple(self.budgets))

    @classmethod
    def build(cls, bundle_dir: str | os.PathLike, *, model_id: str, kind: str,
              export_format: str, layout: str, quantize: str | None,
              budgets: Iterable[BudgetEntry], executorch: dict | None = None) -> Manifest:
        """The manifest of the files `budgets` name in `bundle_dir`, each hashed once here."""
        bundle_dir = Path(bundle_dir)
        budgets = tuple(budgets)
        names = sorted({name for entry in budgets for name in entry.files})
        files = {name: FileEntry.of(bundle_dir / name) for name in names}
        return cls(model_id=model_id, kind=kind, export_format=export_format, layout=layout,
                   quantize=quantize, budgets=budgets, files=files, versions=tool_versions(),
                   executorch=json_ready(executorch))

    def with_deployment(self, deployment: Deployment | None) -> Manifest:
        return dataclasses.replace(self, deployment=deployment)

    @property
    def betas(self) -> list[float]:
        return [entry.beta for entry in self.budgets]

    def _json_items(self) -> dict[str, Any]:
        d = self.deployment
        items = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model_id": self.model_id, "kind": self.kind,
            "export_format": self.export_format, "layout": self.layout,
            "quantize": self.quantize, "budgets": self.budgets,
            "profiles": d.profiles if d else {},
            "host_latency": d.host_latency if d else None,
            "predicted_device_latency": d.predicted_device_latency if d else None,
        }
        if self.executorch is not None:
            items["executorch"] = self.executorch
        if d is not None:
            items["deployment"] = d.decision()
            items["budget_costs"] = d.budget_costs
        return {**items, "files": self.files, "versions": self.versions}

    def to_dict(self) -> dict:
        """The JSON object `write_manifest` writes."""
        items = self._json_items()
        items["budgets"] = [entry.to_dict() for entry in self.budgets]
        items["files"] = {name: entry.to_dict() for name, entry in self.files.items()}
        return json_ready(items)

    @classmethod
    def from_dict(cls, data: dict, source: str | os.PathLike = "manifest") -> Manifest:
        """The manifest `to_dict` wrote; BundleError naming `source` on another format,
        version or field set."""
        if not isinstance(data, dict) or data.get("format") != FORMAT \
                or data.get("format_version") != FORMAT_VERSION:
            found = data if not isinstance(data, dict) else (
                f"format {data.get('format')!r} v{data.get('format_version')}")
            raise BundleError(f"{source}: {found} is not {FORMAT} v{FORMAT_VERSION}")
        data = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        deployment = _deployment_from(data, source)
        fields = _checked_fields(cls, data, str(source))
        try:
            return cls(**{
                **fields,
                "budgets": tuple(BudgetEntry.from_dict(e, f"{source}: budgets[{i}]")
                                 for i, e in enumerate(fields["budgets"])),
                "files": {name: FileEntry(**entry) for name, entry in fields["files"].items()},
                "deployment": deployment,
            })
        except (TypeError, ValueError) as err:
            if isinstance(err, BundleError):
                raise
            raise BundleError(f"{source}: {err}; re-export the bundle") from err

    def verify(self, bundle_dir: str | os.PathLike) -> None:
        """Check that every listed file exists with its size and sha256."""
        bundle_dir = Path(bundle_dir)
        for rel, entry in self.files.items():
            file = bundle_dir / rel
            if not file.is_file():
                raise MissingFileError(f"{file} is listed in the manifest but missing: "
                                       "copy the whole bundle folder, or re-export it")
            size = file.stat().st_size
            if size != entry.bytes or flexrank_io.sha256_file(file) != entry.sha256:
                raise CorruptFileError(f"{file} does not match the manifest ({size} bytes, "
                                       f"expected {entry.bytes} with sha256 "
                                       f"{entry.sha256[:12]}…): the file is corrupt or was "
                                       "changed; re-export the bundle")


_DEPLOYMENT_KEYS = ("profiles", "host_latency", "predicted_device_latency", "budget_costs")


def _deployment_from(data: dict, source) -> Deployment | None:
    """Pops the deployment's keys from `data` (the manifest's JSON without its tag)."""
    figures = {key: data.pop(key, None) for key in _DEPLOYMENT_KEYS}
    decision = data.pop("deployment", None)
    if decision is None:
        if any(figures.values()):
            raise BundleError(f"{source}: has {[k for k, v in figures.items() if v]} but no "
                              "deployment; re-export the bundle")
        return None
    fields = _checked_fields(Deployment, decision, f"{source}: deployment")
    return Deployment(**fields, budget_costs=figures["budget_costs"] or [],
                      profiles=figures["profiles"] or {},
                      predicted_device_latency=figures["predicted_device_latency"],
                      host_latency=figures["host_latency"])


def write_manifest(bundle_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write `manifest` into `bundle_dir` atomically (its hashes as built: nothing is
    hashed here). The manifest is the last file of a bundle."""
    path = Path(bundle_dir) / MANIFEST_FILE
    flexrank_io.write_json_atomic(path, manifest.to_dict())
    return path


def load_manifest(bundle_dir: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read a bundle's manifest; with `verify`, check that every file exists and matches.

    Raises MissingFileError (no manifest, or a listed file missing), CorruptFileError
    (not JSON, or a file that does not match its hash) or BundleError (another format)."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: {bundle_dir} is not a finished FlexRank "
                               "bundle (the export was interrupted, or this is another folder)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON ({err}): re-export the bundle") from err
    manifest = Manifest.from_dict(data, path)
    if verify:
        manifest.verify(bundle_dir)
    return manifest


def budget_entry(manifest: Manifest, beta: float) -> BudgetEntry:
    """The entry of budget `beta` (`flexrank.budget.same_budget`); BundleError listing the
    bundle's budgets when it has none."""
    betas = [entry["beta"] for entry in manifest["budgets"]]
    beta = match_budget(beta, betas, "in this bundle; it has", BundleError)
    return manifest["budgets"][betas.index(beta)]
