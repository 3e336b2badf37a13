"""Operating-system errors end in one line, not a traceback (issue 21 §4): a read-only or
full disk, a path under a file or in /proc give every command one `error:` line naming
the path, the errno's meaning and what to do, and a non-zero exit; a failed write leaves
no partial file; the output is checked writable before the model is loaded.

Faults are real where the test can make them as root (a path under a regular file, /proc,
a small or read-only tmpfs where `mount` works) and injected at the write otherwise."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
import safetensors
import torch
from conftest import char_tokenizer, tiny_llama
from safetensors.torch import load_file, save_file

import flexrank
import flexrank.cli.bench as cli_bench
import flexrank.cli.evaluate as cli_evaluate
import flexrank.cli.export as cli_export
import flexrank.compress.pipeline as pipeline
from flexrank.cli import export_main, main
from flexrank.compress.elastic import ElasticModel
from flexrank.exporters import lock_file
from flexrank.io import WriteError, atomic_dir, check_writable, write_json_atomic

ENOSPC_FROM_SAFETENSORS = ("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")


# ---- fixtures -------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size, read_only) -> a fresh tmpfs under tmp_path; skips the test where
    mounting is not allowed (not root, or a container without CAP_SYS_ADMIN)."""
    mounted = []

    def mount(name: str, size: str = "1m", read_only: bool = False) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        if shutil.which("mount") is None:
            pytest.skip("no mount command here")
        run = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                             capture_output=True, text=True)
        if run.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", str(point)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """Fill the file system of `folder` but `leave` bytes; the filler file."""
    stat = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXRANK_CACHE", str(tmp_path / "cache"))
    tiny_llama(init_std=0.2).save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("".join(f"{i} the quick brown fox jumps over the lazy dog\n"
                            for i in range(400)))
    return tmp_path / "model", text


def compress_argv(model, text, out) -> list[str]:
    return ["compress", str(model), "-o", str(out), "--calib", str(text), "--samples", "16",
            "--seq-len", "32", "--eval-samples", "4", "--batch-size", "4", "--levels", "4",
            "--probe-samples", "2", "--steps", "2", "--train-batch", "4", "--budgets",
            "1,0.7"]


@pytest.fixture
def a_file(tmp_path) -> Path:
    """A regular file: a path under it fails with ENOTDIR, for root too."""
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


def one_error_line(err: str) -> str:
    """The `error:` line of a command's stderr, checking it is the only one and the last
    (the command returned its exit code: nothing escaped as a traceback). Other lines may
    be libraries' logging (optimum's handler can even hold an earlier test's closed
    stream and print a 'Logging error' of its own)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def not_called(*args, **kwargs):
    raise AssertionError("the model was loaded before the output was checked writable")


def temporaries(folder: Path) -> list[str]:
    """Temporary files or folders of the atomic helpers (`.name.XXXX.tmp`, `.name.old`)
    anywhere under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*")
                  if p.name.endswith((".tmp", ".old")))


# ---- the helpers ------------------------------------------------------------------------

def test_check_writable_refuses_paths_under_a_file_and_in_proc(a_file, tmp_path):
    with pytest.raises(WriteError) as caught:
        check_writable(a_file / "out" / "deeper", "the output folder (-o)")
    assert caught.value.errno == errno.ENOTDIR
    assert str(caught.value) == (f"cannot write the output folder (-o) {a_file}/out/deeper: "
                                 f"{a_file} is a file, not a folder (ENOTDIR); choose another "
                                 "path")
    if Path("/proc/self").is_dir():
        with pytest.raises(WriteError, match=r"/proc/flexrank-out: /proc is a special folder"):
            check_writable("/proc/flexrank-out", "the output folder (-o)")
    before = sorted(tmp_path.iterdir())
    check_writable(tmp_path / "new" / "folder", "the output folder (-o)")  # creates nothing
    assert sorted(tmp_path.iterdir()) == before


def test_check_writable_on_a_read_only_and_a_full_disk(tmpfs):
    read_only = tmpfs("ro", read_only=True)
    with pytest.raises(WriteError) as caught:
        check_writable(read_only / "out", "the output folder (-o)")
    assert caught.value.errno == errno.EROFS and f"{read_only}/out" in str(caught.value)
    assert "Read-only file system (EROFS); choose an output folder on a writable disk" \
        in str(caught.value)
    full = tmpfs("full", size="64k")
    fill(full, 0)
    with pytest.raises(WriteError) as caught:
        check_writable(full / "out", "the output folder (-o)")
    assert caught.value.errno == errno.ENOSPC and "free some space" in str(caught.value)
    assert sorted(p.name for p in full.iterdir()) == ["filler"]  # the probe file is gone


def test_a_full_disk_leaves_no_partial_file(tmpfs):
    disk = tmpfs("disk", size="256k")
    target = disk / "data.json"
    write_json_atomic(target, {"old": True})
    with pytest.raises(WriteError) as caught:
        write_json_atomic(target, {"big": "x" * 400_000})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in disk.iterdir()) == ["data.json"]


def test_a_full_disk_in_a_safetensors_checkpoint_keeps_the_previous_one(tmpfs):
    disk = tmpfs("disk", size="512k")
    folder = disk / "checkpoint"
    with atomic_dir(folder) as tmp:
        save_file({"w": torch.arange(4.0)}, str(tmp / "weights.safetensors"))
    with pytest.raises(WriteError) as caught, atomic_dir(folder) as tmp:
        save_file({"w": torch.zeros(1 << 18)}, str(tmp / "weights.safetensors"))  # 1 MiB
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(folder)
    assert isinstance(caught.value.__cause__, safetensors.SafetensorError)
    assert torch.equal(load_file(str(folder / "weights.safetensors"))["w"], torch.arange(4.0))
    assert sorted(p.name for p in disk.iterdir()) == ["checkpoint"]


def test_a_failed_rename_puts_the_previous_folder_back(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint"
    with atomic_dir(folder) as tmp:
        (tmp / "a.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):  # the second rename of atomic_dir (new folder into place) fails
        if Path(src).name.endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system", str(src), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteError, match=f"could not write {folder}: Read-only file system"), \
            atomic_dir(folder) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (folder / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_errors_that_are_not_writes_pass_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError) as caught, atomic_dir(tmp_path / "out"):
        (tmp_path / "missing-input").read_text()  # an input, not the output
    assert not isinstance(caught.value, WriteError)
    with pytest.raises(safetensors.SafetensorError), atomic_dir(tmp_path / "out"):
        raise safetensors.SafetensorError("Error while deserializing header: HeaderTooLarge")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- the CLI's one line ------------------------------------------------------------------

def test_cli_turns_os_errors_into_one_line_and_keeps_programming_errors(monkeypatch, capsys):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/models/m/model.safetensors")

    monkeypatch.setattr(flexrank, "load_model", denied)
    assert main(["decompose", "m"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "error: /models/m/model.safetensors: Permission denied (EACCES); choose a folder you "
        "may write, or change its permissions")
    with pytest.raises(PermissionError):  # -v keeps the traceback
        main(["-v", "decompose", "m"])

    def damaged(args):
        raise safetensors.SafetensorError("Error while deserializing header: HeaderTooLarge")

    monkeypatch.setattr(cli_evaluate, "cmd_eval", damaged)
    assert main(["eval", "x", "--text", "t"]) == 2
    assert "safetensors: Error while deserializing header" in one_error_line(
        capsys.readouterr().err)

    def bug(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(cli_evaluate, "cmd_eval", bug)
    with pytest.raises(TypeError):  # a programming error is not turned into a line
        main(["eval", "x", "--text", "t"])


def test_eval_of_a_folder_as_text_is_one_line(checkpoint, tmp_path, capsys):
    assert main(["eval", str(checkpoint), "--text", str(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: {tmp_path}: Is a directory (EISDIR); give a file's path"


# ---- compress -----------------------------------------------------------------------------

def test_compress_checks_its_output_before_loading(model_dir, a_file, monkeypatch, capsys):
    model, text = model_dir
    monkeypatch.setattr(pipeline, "load_model", not_called)
    out = a_file / "out"
    assert main(compress_argv(model, text, out)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write the compress output folder {out}: ")
    assert "(ENOTDIR)" in line


def test_compress_on_a_read_only_disk(model_dir, tmpfs, monkeypatch, capsys):
    model, text = model_dir
    monkeypatch.setattr(pipeline, "load_model", not_called)
    out = tmpfs("ro", read_only=True) / "out"
    assert main(compress_argv(model, text, out)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"compress output folder {out}: Read-only file system (EROFS)" in line


def test_compress_read_only_at_a_rename(model_dir, tmp_path, monkeypatch, capsys):
    model, text = model_dir
    out = tmp_path / "out"
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "decomposed.safetensors":
            raise OSError(errno.EROFS, "Read-only file system", str(src), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert main(compress_argv(model, text, out)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"error: could not write {out}/stages/decomposed.safetensors: Read-only "
                    "file system (EROFS); choose an output folder on a writable disk (nothing "
                    "partial was left behind)")
    assert temporaries(out) == []
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["calibration.safetensors"]


def test_compress_full_disk_in_a_safetensors_write(model_dir, tmp_path, monkeypatch, capsys):
    model, text = model_dir
    out = tmp_path / "out"

    real_save = pipeline.save_safetensors_model

    def partial_write(model, filename, metadata=None, **kwargs):
        if ".decomposed.safetensors." in Path(filename).name:
            Path(filename).write_bytes(b"\0" * 100)  # what a write cut short leaves
            raise safetensors.SafetensorError(ENOSPC_FROM_SAFETENSORS)
        return real_save(model, filename, metadata=metadata, **kwargs)

    monkeypatch.setattr(pipeline, "save_safetensors_model", partial_write)
    assert main(compress_argv(model, text, out)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: could not write {out}/stages/decomposed.safetensors: No "
                           "space left on device (ENOSPC); free some space")
    assert temporaries(out) == []
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["calibration.safetensors"]


def test_compress_on_a_full_disk_then_resumes(model_dir, tmpfs, capsys):
    """A real full disk (a 4 MiB tmpfs with 48 KiB left: the calibration tokens fit, the
    decomposed weights do not): one line, no partial file, and the run resumes once there
    is room."""
    model, text = model_dir
    disk = tmpfs("disk", size="4m")
    filler = fill(disk, 48 * 1024)
    out = disk / "out"
    assert main(compress_argv(model, text, out)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"could not write {out}/" in line and "No space left on device (ENOSPC)" in line
    assert temporaries(disk) == []
    done = json.loads((out / pipeline.STATE_FILE).read_text())["done"]
    for name in done:  # what a finished stage wrote is whole
        if (out / "stages" / f"{name}.safetensors").exists():
            load_file(str(out / "stages" / f"{name}.safetensors"))
    filler.unlink()
    assert main(compress_argv(model, text, out)) == 0
    assert ElasticModel.from_pretrained(out).budgets == [0.7, 1.0]


# ---- export ---------------------------------------------------------------------------

def test_export_checks_its_output_before_loading(checkpoint, a_file, monkeypatch, capsys):
    monkeypatch.setattr(cli_export, "load_or_compress", not_called)
    dist = a_file / "dist"
    assert export_main([str(checkpoint), "--budget", "0.8", "-o", str(dist)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write the folder that holds -o {dist}")
    assert "(ENOTDIR)" in line


def test_export_on_a_read_only_disk(checkpoint, tmpfs, monkeypatch, capsys):
    monkeypatch.setattr(cli_export, "load_or_compress", not_called)
    dist = tmpfs("ro", read_only=True) / "dist"
    assert export_main([str(checkpoint), "--budget", "0.8", "-o", str(dist)]) == 2
    assert "Read-only file system (EROFS)" in one_error_line(capsys.readouterr().err)


def test_export_full_disk_leaves_no_bundle(checkpoint, tmp_path, monkeypatch, capsys):
    def partial_save(model, path, *args, **kwargs):  # a write() cut short names no file
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", partial_save)
    dist = tmp_path / "dist"
    assert export_main([str(checkpoint), "--budget", "0.8", "-o", str(dist)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: could not write {dist}: No space left on device (ENOSPC)")
    assert not dist.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != lock_file(dist).name) == []


# ---- bench ------------------------------------------------------------------------------

def test_bench_checks_its_output_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_bench, "bench", not_called)
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "bench").write_text("a file where bench/ goes")
    assert main(["bench", str(dist)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write flexrank bench's output folder DIST_DIR/bench "
                           f"{dist}/bench: ")
    assert "(ENOTDIR)" in line


def test_bench_on_a_read_only_bundle(tmpfs, monkeypatch, capsys):
    monkeypatch.setattr(cli_bench, "bench", not_called)
    dist = tmpfs("ro", read_only=True)
    assert main(["bench", str(dist)]) == 2
    assert "Read-only file system (EROFS)" in one_error_line(capsys.readouterr().err)
