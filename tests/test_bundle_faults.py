"""A bundle is finished or absent (issue 21 §1, §2, §6): the compress cache is keyed on
the model, not the path typed; an interrupted export leaves no bundle and the previous
one intact; a second writer is refused; the API deletes nothing it did not write; files
and folders get the modes the umask gives."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import char_tokenizer, tiny_llama
from elastic_fixtures import tiny_elastic
from safetensors.torch import save_file

import flexrank.cli.export as cli_export
import flexrank.exporters as exporters_api
from flexrank.cli import export_main
from flexrank.compress.elastic import META_FILE, ElasticModel
from flexrank.exporters import BundleLockedError, export, lock_file
from flexrank.exporters.onnx.convert import OnnxExportConfig
from flexrank.io import atomic_dir, atomic_path, write_json_atomic
from flexrank.manifest import MANIFEST_FILE, MissingFileError, load_manifest

QUICK = OnnxExportConfig(validate=False)  # these tests are about files, not numbers


@pytest.fixture(scope="module")
def elastic():
    student, _, plan, _, _ = tiny_elastic()
    return ElasticModel(student, plan, char_tokenizer(), model_id="tiny-llama")


@pytest.fixture(scope="module")
def checkpoint(elastic, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    elastic.save_pretrained(folder)
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    """Anything an export left beside `out` apart from its lock file."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}") and p != lock_file(out))


# ---- §1: the compress cache is keyed on the model -------------------------------------

def test_same_relative_path_in_two_folders_is_two_models(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLEXRANK_CACHE", str(tmp_path / "cache"))
    embeddings = {}
    for name, seed in (("a", 1), ("b", 2)):
        work = tmp_path / name
        model = tiny_llama(seed=seed, init_std=0.2)
        model.save_pretrained(work / "m")
        char_tokenizer().save_pretrained(work / "m")
        embeddings[name] = model.model.embed_tokens.weight.detach().numpy()
        monkeypatch.chdir(work)
        assert export_main(["m", "--budget", "1", "--budgets", "1,0.7", "--steps", "2",
                            "-o", "dist"]) == 0
    assert "compressing" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "compress").iterdir())) == 2
    # each bundle holds its own model's embedding table (distillation trains only factors)
    for name, other in (("a", "b"), ("b", "a")):
        dist = tmp_path / name / "dist"
        graph = onnx.load(dist / load_manifest(dist).budgets[0].graph)
        tables = [onnx.numpy_helper.to_array(t) for t in graph.graph.initializer
                  if tuple(t.dims) == embeddings[name].shape]
        assert any(np.array_equal(t, embeddings[name]) for t in tables), name
        assert not any(np.array_equal(t, embeddings[other]) for t in tables), name


def test_model_identity_follows_the_files_not_the_spelling(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"1234")
    monkeypatch.chdir(tmp_path)
    key = cli_export.model_identity("m")
    assert cli_export.model_identity(str(folder)) == key  # the same model, typed otherwise
    (folder / "model.safetensors").write_bytes(b"12345")
    assert cli_export.model_identity("m") != key  # other weights at the same path
    assert cli_export.model_identity("smollm2-135m") != cli_export.model_identity("m")


# ---- §1: interrupted exports ------------------------------------------------------------

class Interrupted(RuntimeError):
    pass


def interrupt(*args, **kwargs):
    raise Interrupted("simulated kill")


@pytest.mark.parametrize("step", ["measure_bundle", "write_manifest"])
def test_interrupted_export_leaves_no_bundle(checkpoint, tmp_path, monkeypatch, step):
    monkeypatch.setattr(cli_export, step, interrupt)  # stage 4, or stage 5 itself
    dist = tmp_path / "dist"
    with pytest.raises(Interrupted):
        export_main([str(checkpoint), "--budget", "0.8", "-o", str(dist)])
    with pytest.raises(MissingFileError, match="not a finished FlexRank bundle"):
        load_manifest(dist)
    assert not dist.exists() and leftovers(dist) == []


def test_interrupted_export_keeps_the_previous_bundle(elastic, tmp_path, monkeypatch):
    dist = tmp_path / "dist"
    before = export(elastic, dist, budgets=[0.6], config=QUICK)
    files = files_of(dist)
    monkeypatch.setattr(exporters_api, "write_manifest", interrupt)
    with pytest.raises(Interrupted):
        export(elastic, dist, budgets=[0.8], config=QUICK)
    assert files_of(dist) == files and load_manifest(dist) == before
    assert leftovers(dist) == []


# ---- §1: one writer per folder ------------------------------------------------------------

@contextmanager
def lock_held_by_another_process(out: Path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from filelock import FileLock; "
         "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); "
         "sys.stdin.read()", str(lock_file(out))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_second_writer_is_refused(elastic, checkpoint, tmp_path, capsys):
    dist = tmp_path / "dist"
    dist.parent.mkdir(exist_ok=True)
    with lock_held_by_another_process(dist):
        assert export_main([str(checkpoint), "--budget", "0.8", "-o", str(dist)]) == 2
        err = capsys.readouterr().err
        assert f"another export is writing {dist}" in err and "stage" not in err
        with pytest.raises(BundleLockedError, match="another export is writing"):
            export(elastic, dist, budgets=[0.6], config=QUICK)
    assert not dist.exists()
    export(elastic, dist, budgets=[0.6], config=QUICK)  # the lock was released
    load_manifest(dist)


# ---- §2: the API deletes nothing it did not create ---------------------------------------

def test_bad_budget_leaves_an_existing_bundle_alone(elastic, tmp_path):
    before = export(elastic, tmp_path / "dist", budgets=[0.6], config=QUICK)
    files = files_of(tmp_path / "dist")
    with pytest.raises(ValueError, match="budget 0.5 is not one of the plan's budgets"):
        export(elastic, tmp_path / "dist", budgets=[0.5], config=QUICK)
    assert files_of(tmp_path / "dist") == files and load_manifest(tmp_path / "dist") == before


def test_compress_folder_is_refused_and_its_checkpoint_kept(elastic, tmp_path):
    work = tmp_path / "work"  # as `flexrank compress` leaves it: elastic/ and its state
    elastic.save_pretrained(work / "elastic")
    (work / "state.json").write_text("{}")
    files = files_of(work)
    with pytest.raises(ValueError, match="is not empty and is not a FlexRank bundle"):
        export(elastic, work, layout="elastic", config=QUICK)
    assert files_of(work) == files
    assert ElasticModel.from_pretrained(work / "elastic").budgets == elastic.budgets


def test_users_own_budget_folder_is_refused_and_kept(elastic, tmp_path):
    out = tmp_path / "out"
    (out / "budget-1").mkdir(parents=True)
    (out / "budget-1" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and is not a FlexRank bundle"):
        export(elastic, out, budgets=[1.0], config=QUICK)
    assert files_of(out) == {"budget-1/notes.txt": b"mine"}


def test_an_old_bundle_is_replaced_as_a_whole(elastic, tmp_path):
    dist = tmp_path / "dist"
    export(elastic, dist, budgets=[0.6, 1.0], config=QUICK)
    manifest = export(elastic, dist, budgets=[0.8], config=QUICK)
    assert sorted(p.name for p in dist.iterdir()) == ["budget-0.8", MANIFEST_FILE]
    assert set(files_of(dist)) == set(manifest.files) | {MANIFEST_FILE}
    assert load_manifest(dist).betas == [0.8] and leftovers(dist) == []


def test_files_a_user_added_to_a_bundle_stop_the_replacement(elastic, tmp_path):
    """An export replaces a bundle whole: what flexrank bench wrote goes with it, a file the
    user put there stops the export instead (found by a new user: NOTES.txt was deleted)."""
    dist = tmp_path / "dist"
    export(elastic, dist, budgets=[0.6], config=QUICK)
    (dist / "bench").mkdir()
    (dist / "bench" / "bench.json").write_text("{}")
    (dist / "NOTES.txt").write_text("mine")
    before = files_of(dist)
    with pytest.raises(ValueError, match=r"holds 1 file\(s\) no export or bench wrote "
                                         r"\(e.g. NOTES.txt\)"):
        export(elastic, dist, budgets=[0.8], config=QUICK)
    assert files_of(dist) == before
    (dist / "NOTES.txt").unlink()
    export(elastic, dist, budgets=[0.8], config=QUICK)  # bench/ is ours: replaced with it
    assert sorted(p.name for p in dist.iterdir()) == ["budget-0.8", MANIFEST_FILE]


# ---- §6: modes follow the umask ------------------------------------------------------------

@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_bundle_and_checkpoint_modes_follow_the_umask(elastic, tmp_path, mask):
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask  # what open() and mkdir() give
    with umask(mask):
        dist = tmp_path / "dist"
        export(elastic, dist, budgets=[0.6], config=QUICK)
        elastic.save_pretrained(tmp_path / "ckpt")
        write_json_atomic(tmp_path / "plain.json", {"a": 1})
        with atomic_path(tmp_path / "stage.safetensors") as tmp:  # save_file writes 0600
            save_file({"w": torch.zeros(2)}, str(tmp))
        with atomic_dir(tmp_path / "folder") as folder:
            (folder / "x").write_text("x")
    assert mode(dist) == dir_mode and mode(dist / MANIFEST_FILE) == file_mode
    assert {mode(dist / name) for name in load_manifest(dist).files} == {file_mode}
    assert mode(tmp_path / "ckpt") == dir_mode
    assert mode(tmp_path / "ckpt" / META_FILE) == file_mode
    assert mode(tmp_path / "plain.json") == file_mode and mode(tmp_path / "folder") == dir_mode
    assert mode(tmp_path / "stage.safetensors") == file_mode
    assert json.loads((tmp_path / "plain.json").read_text()) == {"a": 1}
