"""Small file helpers shared by every stage: the cache folder, atomic writes, hashing,
tokenizer files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600: give it the mode open() would
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700: give it the mode mkdir would
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
