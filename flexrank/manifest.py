"""`flexrank-manifest.json`: what a bundle holds, with a sha256 per file.

The manifest is written last and atomically (temporary file + rename): a bundle folder
without one is an unfinished export. `load_manifest` checks every listed file and raises
a `BundleError` naming the first one that is missing or does not match its hash.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

from flexrank.budget import match_budget
from flexrank.io import sha256_file, write_json_atomic

MANIFEST_FILE = "flexrank-manifest.json"
FORMAT = "flexrank-bundle"
FORMAT_VERSION = 1
TOOLS = ("flexrank", "torch", "transformers", "onnx", "onnxruntime", "optimum", "optimum-onnx")


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


def file_entries(bundle_dir: Path, relative_paths) -> dict[str, dict]:
    """{path: {bytes, sha256}} for files inside the bundle (POSIX relative paths)."""
    entries = {}
    for rel in sorted(set(relative_paths)):
        path = bundle_dir / rel
        entries[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return entries


def write_manifest(bundle_dir: str | os.PathLike, manifest: dict) -> Path:
    """Hash every file the manifest's `budgets` and `extra_files` name, then write it last."""
    bundle_dir = Path(bundle_dir)
    names = list(manifest.pop("extra_files", []))
    for budget in manifest["budgets"]:
        names.extend(budget["files"])
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
            "files": file_entries(bundle_dir, names), "versions": tool_versions()}
    path = bundle_dir / MANIFEST_FILE
    write_json_atomic(path, full)
    return path


def load_manifest(bundle_dir: str | os.PathLike, verify: bool = True) -> dict:
    """Read a bundle's manifest; with `verify`, check that every file exists and matches."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} is missing: {bundle_dir} is not a finished FlexRank "
                               "bundle (the export was interrupted, or this is another folder)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{path} is not valid JSON ({err}): re-export the bundle") from err
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: format {manifest.get('format')!r} "
                          f"v{manifest.get('format_version')} is not {FORMAT} v{FORMAT_VERSION}")
    if verify:
        for rel, entry in manifest["files"].items():
            file = bundle_dir / rel
            if not file.is_file():
                raise MissingFileError(f"{file} is listed in the manifest but missing: "
                                       "copy the whole bundle folder, or re-export it")
            size = file.stat().st_size
            if size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
                raise CorruptFileError(f"{file} does not match the manifest ({size} bytes, "
                                       f"expected {entry['bytes']} with sha256 "
                                       f"{entry['sha256'][:12]}…): the file is corrupt or was "
                                       "changed; re-export the bundle")
    return manifest


def budget_entry(manifest: dict, beta: float) -> dict:
    """The entry of budget `beta` (`flexrank.budget.same_budget`); BundleError listing the
    bundle's budgets when it has none."""
    betas = [entry["beta"] for entry in manifest["budgets"]]
    beta = match_budget(beta, betas, "in this bundle; it has", BundleError)
    return manifest["budgets"][betas.index(beta)]
