"""Small file helpers shared by every stage: the cache folder, atomic writes (and the one
line a failed write turns into), hashing, tokenizer files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """FlexRank's cache folder, or `parts` joined under it (not created): $FLEXRANK_CACHE,
    else $XDG_CACHE_HOME/flexrank, else ~/.cache/flexrank. Every cache (converted models,
    the host measurement, `flexrank-export`'s compress work folders) lives under it, so one
    variable moves them all."""
    if os.environ.get("FLEXRANK_CACHE"):
        root = Path(os.environ["FLEXRANK_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flexrank"
    return root.joinpath(*parts)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write JSON to a temporary file beside `path`, then rename: never a half file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it over `path` on success.

    On any exception the temporary file is removed and `path` is left as it was. A failed
    write (a full disk, a read-only folder, safetensors' own I/O error) raises WriteError
    naming `path`, not the temporary name.
    """
    path = Path(path)
    with _writing(path, None):
        _existing_folder(path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(tmp)
    try:
        with _writing(path, tmp):
            yield tmp
            # mkstemp makes it 0600, and a writer that replaces the file (safetensors'
            # save_file does) leaves its own 0600: give it the mode open() would give
            os.chmod(tmp, 0o666 & ~umask())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only on success.

    On any exception the temporary folder is removed and `path` is left as it was; a
    failed write raises WriteError naming `path`.
    """
    path = Path(path)
    with _writing(path, None):
        _existing_folder(path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _writing(path, tmp):
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700: the mode mkdir would give
            yield tmp
            _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_interrupted_write(path: str | os.PathLike) -> list[Path]:
    """Undo what a killed atomic write to `path` left beside it; returns what was removed.

    A process killed inside `atomic_path`/`atomic_dir` (SIGKILL, power loss) cannot clean
    up: its `.NAME.*.tmp` file or folder stays, and one killed between the two renames of
    `_replace_dir` leaves the previous folder as `.NAME.old` with `path` missing, which is
    put back. Only for a caller holding the lock on `path` (a running writer's temporary
    looks the same).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        os.replace(old, path)  # the previous folder, whole: the new one never arrived
    # tempfile's names: prefix + 8 characters of [a-z0-9_] + suffix (".NAME.k3j9ab_x.tmp")
    ours = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    removed = sorted(p for p in path.parent.iterdir() if ours.fullmatch(p.name))
    if old.exists():
        removed.append(old)
    for stale in removed:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return removed


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename folder `tmp` over `path`; if the second rename fails, the old `path` is put
    back (a folder cannot be renamed over a non-empty one in one step)."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


# What to do about the errors that writing (or reading) a path meets most often.
ADVICE = {
    errno.EROFS: "choose an output folder on a writable disk",
    errno.EACCES: "choose a folder you may write, or change its permissions",
    errno.EPERM: "choose a folder you may write, or change its permissions",
    errno.ENOSPC: "free some space or choose an output folder on another disk",
    errno.EDQUOT: "free some space or choose an output folder on another disk",
    errno.EFBIG: "choose an output folder on a file system that holds large files",
    errno.ENOTDIR: "choose another path",
    errno.EISDIR: "give a file's path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
}
# Errors that mean a write failed whichever file they name (a write() names none).
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO})


class WriteError(OSError):
    """A file or folder that could not be written. `errno`, `strerror` and `filename` (the
    path meant, never a temporary name) are OSError's; str() is one line: what failed,
    where, the errno's meaning and what to do."""

    def __init__(self, what: str, path: str | os.PathLike, code: int | None, reason: str,
                 note: str = ""):
        super().__init__(code, reason, str(path))
        self.what, self.note = what, note

    def __str__(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"{self.what} {self.filename}: {_meaning(self.errno, self.strerror)}{note}"


def describe_os_error(err: OSError) -> str:
    """One line for any OSError: the path(s) it names, the errno's meaning and name, and
    what to do (`/out/x: Read-only file system (EROFS); choose an output folder ...`)."""
    if isinstance(err, WriteError) or err.errno is None:
        return str(err)
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    meaning = _meaning(err.errno, err.strerror)
    return f"{paths}: {meaning}" if paths else meaning


def _meaning(code: int | None, reason: str | None) -> str:
    if code is None:
        return reason or "unknown error"
    text = f"{reason or os.strerror(code)} ({errno.errorcode.get(code, code)})"
    return f"{text}; {ADVICE[code]}" if code in ADVICE else text


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raise WriteError unless files can be created in folder `path`, or, where it does
    not exist yet, in the nearest existing folder above it (where it would be created).

    Called before the long stages (loading a model, compressing, measuring), so that a
    read-only disk, a full one (a one-byte write) or a path under a file fails in a second,
    not after the work. `what` says which output it is ("the output folder (-o)").
    Creates nothing but a one-byte probe file, removed at once.
    """
    path = Path(path).expanduser().absolute()
    try:
        folder = _existing_folder(path)
        fd, probe = tempfile.mkstemp(prefix=".flexrank-write-check.", dir=folder)
    except OSError as err:
        reason = err.strerror
        if err.errno == errno.ENOENT:  # the folder exists: it takes no files (/proc, /sys)
            reason = f"{folder} is a special folder that holds no new files"
        raise WriteError(f"cannot write {what}", path, err.errno, reason) from None
    try:
        os.write(fd, b"\0")
    except OSError as err:
        raise WriteError(f"cannot write {what}", path, err.errno, err.strerror) from None
    finally:
        os.close(fd)
        os.unlink(probe)


def _existing_folder(path: Path) -> Path:
    """The nearest existing folder at or above `path` (where it would be created);
    NotADirectoryError if that is a file."""
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{folder} is a file, not a folder", str(path))
    return folder


@contextmanager
def _writing(path: Path, tmp: Path | None) -> Iterator[None]:
    """Turn a failed write of `path` (through its temporary `tmp`) into a WriteError that
    names `path`; other errors (a programming error, a missing input) pass unchanged."""
    try:
        yield
    except Exception as err:
        code = _write_errno(err, path, tmp)
        if code is False:
            raise
        note = "nothing partial was left behind" if tmp else ""
        raise WriteError("could not write", path, code or None, _strerror(err, code),
                         note) from err


def _write_errno(err: Exception, path: Path, tmp: Path | None) -> int | bool:
    """The errno of `err` (0 when it has none) if it is a failed write of `path`, else
    False: before the temporary exists (tmp None) any OSError is; after, one that names
    `path`, its temporary or old copy, or one that only writes meet (a full disk)."""
    if isinstance(err, OSError):
        names = [Path(n) for n in (err.filename, err.filename2) if n is not None]
        ours = tmp is None or any(_is_ours(n, path) for n in names)
        return (err.errno or 0) if ours or err.errno in WRITE_ERRNOS else False
    if _is_safetensors_error(err):
        found = re.search(r"os error (\d+)", str(err))
        return int(found.group(1)) if found else False
    return False


def _is_ours(name: Path, path: Path) -> bool:
    """`path`, a file under it, or a sibling `.<name>.*` (its temporary or old copy) or a
    file under one."""
    for candidate in (name, *name.parents):
        if candidate == path or (candidate.parent == path.parent
                                 and candidate.name.startswith(f".{path.name}.")):
            return True
    return False


def _strerror(err: Exception, code: int | None) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return os.strerror(code) if code else str(err)


def _is_safetensors_error(err: BaseException) -> bool:
    """safetensors' own error (its I/O failures are not OSErrors); only looked up where
    safetensors is already imported, since nothing else can have raised it."""
    module = sys.modules.get("safetensors")
    error = getattr(module, "SafetensorError", None)
    return error is not None and isinstance(err, error)


def umask() -> int:
    """The process's umask, read from /proc where it can be (setting it to read it would
    change it for every thread meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
    """The tokenizer's files in `directory`; a fast tokenizer writes only tokenizer.json and
    its configs. The slow files add nothing that loads it and can be large: SmolLM2's
    tokenizer rebuilt from GGUF writes a 98 MB tokenizer.model into every bundle."""
    if getattr(tokenizer, "is_fast", False):
        tokenizer.save_pretrained(directory, legacy_format=False)
    else:
        tokenizer.save_pretrained(directory)
