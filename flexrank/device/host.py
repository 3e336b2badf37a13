"""The host this process runs on, measured (never looked up): compute, memory bandwidth and
RAM, cached per machine; and the thread count a profile gets on it."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from flexrank.device.profiles import DeviceProfile, Quantity
from flexrank.io import cache_dir, write_json_atomic

logger = logging.getLogger(__name__)

GB = 1e9  # profiles use decimal units
MIB = 2**20


# The host: measured, never looked up


@dataclass(frozen=True)
class HostMeasurement:
    key: str  # hostname-cpucount: a cache entry is only reused on the same machine
    compute_gflops: float
    memory_bandwidth_gbps: float
    ram_gb: float
    cpu_count: int


def host_cache_path() -> Path:
    """The measurements of every host this cache has seen, {host_key: HostMeasurement}."""
    return cache_dir("host.json")


def host_key() -> str:
    return f"{platform.node() or 'unknown'}-{os.cpu_count()}"


def measure_matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` float32 n×n matmul throughput through numpy's BLAS, in GFLOP/s."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    a @ b  # warm-up: thread pool start, page faults
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / GB


def measure_copy_gbps(mib: int = 128, repeats: int = 5) -> float:
    """Best-of-`repeats` copy of a float32 array larger than any cache: bytes read + written
    per second, in GB/s."""
    import numpy as np

    src = np.ones(mib * MIB // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # warm-up: fault the pages in
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best / GB


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _physical_ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (AttributeError, ValueError, OSError) as err:
        raise RuntimeError("cannot read the physical memory size on this platform; write a "
                           "profile YAML for this machine with ram_gb given") from err


def measure_host(refresh: bool = False) -> HostMeasurement:
    """Measure this machine (about a second), or reuse the cached measurement for it."""
    path, key = host_cache_path(), host_key()
    cache = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            logger.warning("ignoring unreadable host cache %s", path)
    entry = cache.get(key) if isinstance(cache, dict) else None
    if entry and not refresh:
        try:
            return HostMeasurement(**entry)
        except TypeError:
            logger.warning("ignoring stale host cache entry %s in %s", key, path)
    logger.info("measuring host %s (matmul GFLOP/s, copy GB/s)", key)
    measured = HostMeasurement(key, measure_matmul_gflops(), measure_copy_gbps(),
                               _physical_ram_gb(), os.cpu_count() or 1)
    cache = cache if isinstance(cache, dict) else {}
    cache[key] = asdict(measured)
    try:
        write_json_atomic(path, cache)
    except OSError as err:
        logger.warning("could not cache the host measurement in %s: %s", path, err)
    return measured


def resolve_measured(profile: DeviceProfile) -> DeviceProfile:
    """The profile with its `measured` quantities filled in from `measure_host()`."""
    if profile.is_resolved:
        return profile
    host = measure_host()

    def fill(q: Quantity, value: float) -> Quantity:
        if q.value is not None:
            return q
        return replace(q, value=value, source=f"{q.source} = {value:.4g} {q.unit} on {host.key}")

    threads = min(profile.threads, host.cpu_count)
    if threads != profile.threads:
        logger.warning("host has %d cores; using %d threads, not %d", host.cpu_count, threads,
                       profile.threads)
    return replace(
        profile, threads=threads,
        cores=replace(profile.cores, count=fill(profile.cores.count, host.cpu_count)),
        ram_gb=fill(profile.ram_gb, host.ram_gb),
        memory_bandwidth_gbps=fill(profile.memory_bandwidth_gbps, host.memory_bandwidth_gbps),
        compute_gflops=fill(profile.compute_gflops, host.compute_gflops))


def host_threads(profile) -> int:
    wanted = profile.threads if profile else 2
    return max(1, min(wanted, os.cpu_count() or 1))
