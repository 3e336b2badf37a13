"""The typed manifest: it reads the JSON that bundles already hold, refuses other formats
naming the file, and `flexrank-export` hashes each bundle file once and writes the
manifest once, last."""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

import flexrank.io
from flexrank.cli import export_main
from flexrank.manifest import (
    MANIFEST_FILE,
    BudgetEntry,
    BundleError,
    Deployment,
    Format,
    Layout,
    Manifest,
    Quantization,
    load_manifest,
    write_manifest,
)

ENTRY = {
    "beta": 0.6, "files": ["elastic/config.json", "elastic/model.onnx"], "bytes": 1234,
    "params": {"factorised": 10, "factorised_dense": 20, "kept": 0.5, "other": 7},
    "forms": {"factors": 2}, "ranks": {"model.layers.0.mlp.up_proj": 3},
    "layers": [{"name": "model.layers.0.mlp.up_proj", "shape": [8, 6], "rank": 3,
                "form": "factors", "condition": None, "params": 42}],
    "validation": {"max_abs_diff": 1e-6, "top1_agreement": 1.0, "generation_match": True},
    "graph": "elastic/model.onnx", "rank_level": 0, "kv_cache_in_place": True,
}
# A manifest as the exporter and `flexrank-export` wrote it before the typed Manifest.
API_BUNDLE = {
    "format": "flexrank-bundle", "format_version": 1, "model_id": "tiny-llama",
    "kind": "decoder", "export_format": "onnx", "layout": "elastic", "quantize": None,
    "budgets": [ENTRY], "profiles": {}, "host_latency": None,
    "predicted_device_latency": None,
    "files": {"elastic/config.json": {"bytes": 34, "sha256": "ab" * 32},
              "elastic/model.onnx": {"bytes": 1200, "sha256": "cd" * 32}},
    "versions": {"python": "3.11.7", "torch": "2.9.0", "optimum-onnx": None},
}
CLI_BUNDLE = {
    **API_BUNDLE,
    "profiles": {"pixel8": {"label": "predicted", "chosen_beta": 0.6}},
    "host_latency": {"beta": 0.6, "decode_ms_median": 3.5, "label": "measured on host x"},
    "predicted_device_latency": {"label": "predicted", "profile": "pixel8", "budgets": []},
    "budget_costs": [{"beta": 0.6, "flops_per_token": 100}],
    "deployment": {"profile": "pixel8", "budget_request": "auto", "chosen_beta": 0.6,
                   "threads": 4},
}


@pytest.mark.parametrize("data", [API_BUNDLE, CLI_BUNDLE], ids=["api", "cli"])
def test_manifest_reads_the_json_bundles_hold(data, tmp_path):
    manifest = Manifest.from_dict(copy.deepcopy(data))
    assert manifest.to_dict() == data  # every key and value kept, nothing added
    assert manifest.export_format is Format.ONNX and manifest.layout is Layout.ELASTIC
    entry = manifest.budgets[0]
    assert isinstance(entry, BudgetEntry) and entry.graph == "elastic/model.onnx"
    assert entry.rank_level == 0 and entry.int8_float_layers is None
    assert manifest.files["elastic/model.onnx"].bytes == 1200
    # code written against the JSON reads it the same way
    assert manifest["budgets"][0]["graph"] == "elastic/model.onnx"
    assert manifest["files"]["elastic/model.onnx"]["bytes"] == 1200
    assert "program" not in entry and entry["program"] is None
    assert manifest == data and manifest == Manifest.from_dict(json.loads(json.dumps(data)))
    if "deployment" in data:
        assert manifest.deployment.chosen_beta == 0.6 and manifest.deployment.threads == 4
        assert manifest.deployment.host_latency["decode_ms_median"] == 3.5
        assert manifest["deployment"] == data["deployment"]
    else:
        assert manifest.deployment is None and manifest.get("deployment") is None
    write_manifest(tmp_path, manifest)
    assert json.loads((tmp_path / MANIFEST_FILE).read_text()) == data
    assert load_manifest(tmp_path, verify=False) == manifest


def test_deployment_is_spread_over_the_keys_it_had():
    deployment = Deployment(chosen_beta=0.8, budget_request="0.8", budget_costs=[{"beta": 0.8}])
    manifest = Manifest.from_dict(copy.deepcopy(API_BUNDLE)).with_deployment(deployment)
    data = manifest.to_dict()
    assert data["deployment"] == {"profile": None, "budget_request": "0.8", "chosen_beta": 0.8,
                                  "threads": None}
    assert data["budget_costs"] == [{"beta": 0.8}] and data["profiles"] == {}
    assert Manifest.from_dict(data) == manifest
    quantized = Manifest.from_dict({**copy.deepcopy(API_BUNDLE), "quantize": "int8"})
    assert quantized.quantize is Quantization.INT8


@pytest.mark.parametrize("change, message", [
    ({"format": "other"}, r"format 'other' v1 is not flexrank-bundle v1"),
    ({"format_version": 2}, r"v2 is not flexrank-bundle v1"),
    ({"colour": "red"}, r"unknown \['colour'\]"),
    ({"budgets": [{**ENTRY, "speed": 1}]}, r"budgets\[0\]: unknown \['speed'\]"),
    ({"budgets": [{k: v for k, v in ENTRY.items() if k != "graph"}]}, r"missing \['graph'\]"),
    ({"layout": "diagonal"}, r"'diagonal' is not a valid Layout"),
    ({"host_latency": {"decode_ms_median": 1.0}}, r"host_latency.*but no deployment"),
])
def test_manifest_of_another_format_is_refused_naming_the_file(change, message, tmp_path):
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({**API_BUNDLE, **change}))
    with pytest.raises(BundleError, match=message) as error:
        load_manifest(tmp_path, verify=False)
    assert str(tmp_path / MANIFEST_FILE) in str(error.value)


def test_export_hashes_each_file_once_and_writes_the_manifest_once(checkpoint, tmp_path,
                                                                     monkeypatch):
    hashed, written = [], []
    real_hash, real_write = flexrank.io.sha256_file, flexrank.io.write_json_atomic

    def counting_hash(path, *args, **kwargs):
        hashed.append(Path(path))
        return real_hash(path, *args, **kwargs)

    def counting_write(path, data):
        written.append(Path(path))
        return real_write(path, data)

    monkeypatch.setattr(flexrank.io, "sha256_file", counting_hash)
    monkeypatch.setattr(flexrank.io, "write_json_atomic", counting_write)
    dist = tmp_path / "dist"
    assert export_main([str(checkpoint), "--profile", "pixel8", "--budget", "auto",
                        "--format", "onnx", "--layout", "per-budget", "-o", str(dist)]) == 0
    monkeypatch.undo()

    manifests = [p for p in written if p.name == MANIFEST_FILE]
    assert len(manifests) == 1  # written once, last, in the folder renamed into place
    staging = manifests[0].parent
    assert staging.parent == dist.parent and not staging.exists()
    counts = Counter(p.relative_to(staging).as_posix() for p in hashed)
    on_disk = {p.relative_to(dist).as_posix() for p in dist.rglob("*") if p.is_file()}
    assert set(counts) == on_disk - {MANIFEST_FILE} and set(counts.values()) == {1}
    manifest = load_manifest(dist)  # a later reader verifies
    assert manifest.deployment.profile == "pixel8" and manifest.deployment.host_latency
    for name, entry in manifest.files.items():  # the hashes written are the files' hashes
        assert entry.sha256 == hashlib.sha256((dist / name).read_bytes()).hexdigest()
        assert entry.bytes == (dist / name).stat().st_size
