"""Calibration hidden states kept per batch, in memory or in files on disk (issue 20).

Block-sequential calibration (`flexrank.compress.blockwise`) keeps every calibration
batch's input hidden states of the current block: tokens × hidden size in the model's
dtype (Llama-3-8B, 512 × 2048 tokens: 8.6 GB in bf16). `HiddenStates` holds them in
memory, or, given a folder, one file per batch, so that one batch is in memory at a time
(the one being run). Files are written with `torch.save` through `flexrank.io.atomic_path`
(never a half file) and read back with `torch.load(mmap=True, weights_only=True)`: the
pages come from the file as the block reads them, and the bytes are the ones written, so
the maths is unchanged. Each run writes into a new folder of its own (`tempfile.mkdtemp`,
named `flexrank-hidden-*`) that it removes at the end, also on an error; a killed run
leaves that folder behind, and no later run reads it (remove it by hand).

"auto" offloads when the hidden states would take more than AUTO_OFFLOAD_FRACTION of the
memory available to them: the accelerator's free memory (`torch.cuda.mem_get_info`) for a
model on a GPU, else the host's MemAvailable (psutil's `virtual_memory().available`,
which reads /proc/meminfo on Linux; /proc/meminfo directly without psutil).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from flexrank.io import WriteError, atomic_path, check_writable

# Each run's folder of offloaded hidden states: `<parent>/flexrank-hidden-XXXX`.
OFFLOAD_PREFIX = "flexrank-hidden-"

logger = logging.getLogger(__name__)

# "auto" offloads when the hidden states of the calibration set would take more than this
# share of the available memory: the rest goes to the block's activations (attention
# scores are batch × heads × tokens²), one block's float64 covariances and their
# eigendecompositions, and the factors being built.
AUTO_OFFLOAD_FRACTION = 0.25
AUTO = "auto"


def available_memory(device: torch.device) -> int:
    """Bytes of memory available for new tensors on `device`: the GPU's free memory
    (`torch.cuda.mem_get_info`) for a CUDA device, else the host's available memory
    (psutil's `virtual_memory().available`, /proc/meminfo's MemAvailable without psutil).
    Raises OSError when neither source is readable (not Linux, no psutil)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
    except ImportError:
        with open("/proc/meminfo") as meminfo:  # "MemAvailable:   16324412 kB"
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        raise OSError(errno.ENOENT, "/proc/meminfo has no MemAvailable line: pass a folder "
                      "or None instead of 'auto'") from None
    return psutil.virtual_memory().available


def should_offload(estimated_bytes: int, device: torch.device) -> bool:
    """Whether "auto" offloads hidden states of `estimated_bytes` bytes kept on `device`:
    more than AUTO_OFFLOAD_FRACTION of `available_memory(device)`."""
    available = available_memory(device)
    offload = estimated_bytes > AUTO_OFFLOAD_FRACTION * available
    logger.info("calibration hidden states: ~%.2f GB, %.2f GB available on %s: %s",
                estimated_bytes / 2**30, available / 2**30, device,
                "kept on disk" if offload else "kept in memory")
    return offload


def save_hidden(hidden: torch.Tensor, path: Path) -> None:
    """Write `hidden` to `path` (whole, or nothing: atomic_path)."""
    with atomic_path(path) as tmp:
        torch.save(hidden, tmp)


def load_hidden(path: Path, device: torch.device) -> torch.Tensor:
    """`path`'s tensor on `device`, memory-mapped on the CPU (pages read on use) where a
    mapped file can be removed while in use (POSIX; not Windows)."""
    return torch.load(path, map_location=device, mmap=os.name == "posix", weights_only=True)


class HiddenStates:
    """One tensor per calibration batch: `put(b, tensor)`, `take(b)` (which forgets it).

    In memory until `open(folder)`, which makes a new `flexrank-hidden-*` folder inside
    `folder`: then each `put` writes one file there and each `take` reads it back and
    removes it (the mapped pages stay readable until the tensor is freed); `close()`
    removes the folder. Use as a context manager: the folder goes also on an error.
    Raises WriteError (an OSError) for a folder that cannot be written, and from
    `check_space` for one without room for the estimated bytes.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.parent: Path | None = None  # where the files go; None: in memory
        self.folder: Path | None = None  # this run's own folder inside `parent`
        self._held: dict[int, torch.Tensor] = {}

    @property
    def on_disk(self) -> bool:
        return self.parent is not None

    def open(self, folder: str | os.PathLike | None) -> HiddenStates:
        """Keep the tensors in a new folder inside `folder` (created if missing), or in
        memory for None."""
        if folder is not None:
            self.parent = Path(folder)
            check_writable(self.parent, "the folder for offloaded hidden states")
            self.parent.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=OFFLOAD_PREFIX, dir=self.parent))
            logger.info("calibration hidden states go to %s", self.folder)
        return self

    def close(self) -> None:
        self._held.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> HiddenStates:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_space(self, estimated_bytes: int) -> None:
        """Raise WriteError (ENOSPC) now, rather than midway, when the folder's disk has
        less free space than `estimated_bytes`."""
        if self.folder is None:
            return
        free = shutil.disk_usage(self.folder).free
        if free < estimated_bytes:
            raise WriteError(
                "cannot offload the calibration hidden states to", self.parent, errno.ENOSPC,
                f"they need ~{estimated_bytes / 2**30:.2f} GB and the disk has "
                f"{free / 2**30:.2f} GB free",
                "choose a folder on a larger disk, or fewer calibration tokens")

    def _path(self, batch: int) -> Path:
        assert self.folder is not None, "HiddenStates on disk after close()"
        return self.folder / f"batch-{batch:06d}.pt"

    def put(self, batch: int, hidden: torch.Tensor) -> None:
        if not self.on_disk:
            self._held[batch] = hidden
            return
        save_hidden(hidden, self._path(batch))

    def take(self, batch: int) -> torch.Tensor:
        if not self.on_disk:
            return self._held.pop(batch)
        path = self._path(batch)
        hidden = load_hidden(path, self.device)
        path.unlink()  # a mapped file stays readable until the tensor is freed (POSIX)
        return hidden
