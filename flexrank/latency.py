"""Latency and memory model of a budget on a device profile, and `--budget auto`.

A roofline model (Williams, Waterman & Patterson, "Roofline", CACM 2009) with a fixed
per-layer cost, applied to LLM inference as usual: prefill is compute-bound, decode is
memory-bound (every weight is read once per generated token).

    prefill  = (prompt × (F − F_head) + F_head) / (C × e_c) + L × o
    decode   = max(B_token / (W × e_w), F / (C × e_c)) + L × o
    memory   = weights + KV bytes per token × context + activations per token × prompt

F: FLOPs per token, B_token: bytes read per decoded token (weights plus the KV cache at
the prompt's length), C and W: the profile's peak compute and bandwidth, L: layers, and
the efficiency factors e_c, e_w, o of the runtime (`Efficiency`). Attention's own FLOPs,
quadratic in the prompt, are left out: under 1 % for ≤ 1B models at prompts ≤ 256 tokens.

Known limits: compute is counted at the fp32 rate, so quantized int8 kernels prefill
faster than predicted; decode is predicted at the prompt's length, not at a full context.
Device numbers from here are predictions; only the host's numbers are ever measured.
`check_published()` compares the model with published phone measurements.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from flexrank.io import write_json_atomic
from flexrank.profiles import DeviceProfile, Quantity, load_profile

logger = logging.getLogger(__name__)

GB = 1e9  # profiles use decimal units
MIB = 2**20
AT_TARGET_RTOL = 1e-9  # a prediction exactly at its target passes; this absorbs float rounding


@dataclass(frozen=True)
class BudgetCost:
    """What one budget of a model costs per token; the caller computes it from the model
    (or `decoder_cost` from a shape). Bytes are as deployed (after any quantization)."""

    beta: float
    flops_per_token: float  # 2 × multiply-adds of one token's forward pass, lm_head included
    weight_bytes_per_token: float  # read per decoded token: all weights, lm_head, 1 embedding row
    weight_bytes_total: float  # resident weights (tied matrices once)
    kv_bytes_per_token: float  # K and V bytes one token adds to the cache, all layers
    n_layers: int
    activation_bytes_per_token: float = 0.0  # live activations per prompt token in prefill
    # Part of flops_per_token that prefill runs for the last prompt token only (the lm_head,
    # when the export returns the last logits only, as ExecuTorch's Llama export does); 0 when
    # logits come for every prompt token (optimum's ONNX decoders).
    head_flops_per_token: float = 0.0
    encoder: bool = False  # encoders have no decode and no KV cache: latency = one forward

    def __post_init__(self):
        if not 0 < self.beta <= 1:
            raise ValueError(f"BudgetCost.beta = {self.beta} is out of range (0, 1]")
        for name in ("flops_per_token", "weight_bytes_per_token", "weight_bytes_total"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"BudgetCost.{name} = {value} must be positive (beta {self.beta})")
        for name in ("kv_bytes_per_token", "activation_bytes_per_token", "head_flops_per_token"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"BudgetCost.{name} = {value} must be >= 0 (beta {self.beta})")
        if self.head_flops_per_token > self.flops_per_token:
            raise ValueError(f"BudgetCost.head_flops_per_token = {self.head_flops_per_token:g} "
                             f"exceeds flops_per_token = {self.flops_per_token:g}")
        if self.n_layers < 1:
            raise ValueError(f"BudgetCost.n_layers = {self.n_layers} must be >= 1")


@dataclass(frozen=True)
class Efficiency:
    """What a runtime reaches of a profile's peak figures."""

    bandwidth: float  # fraction of memory_bandwidth_gbps reached while streaming weights
    compute: float  # fraction of compute_gflops reached in the matmuls
    overhead_per_layer_s: float  # fixed cost per layer and forward pass: dispatch, thread sync
    source: str

    def __post_init__(self):
        for name in ("bandwidth", "compute"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Efficiency.{name} = {value} must be a positive fraction")
            if value > 1:
                logger.warning("Efficiency.%s = %.3g is above 1: the runtime beats the profile's "
                               "figure (%s)", name, value, self.source)
        if not (math.isfinite(self.overhead_per_layer_s) and self.overhead_per_layer_s >= 0):
            raise ValueError(f"Efficiency.overhead_per_layer_s = {self.overhead_per_layer_s} "
                             "must be >= 0")


# One efficiency per runtime/backend, used until a host measurement exists. Chosen a priori
# from general experience with CPU inference, NOT fitted to the published points that
# check_published() compares against (its ratios are the test of this choice):
# - bandwidth 0.6: CPU cores stream roughly 55-75 % of a DRAM bus's peak; 0.6 sits low in
#   that range because decode also computes (dequantises, accumulates) between reads.
# - compute 0.5: XNNPACK/MLAS fp32 GEMMs reach 70-90 % of FMA peak on one core with large
#   matrices; a 64-token prefill on 4 threads (thin matrices, thread sync, and norms, RoPE
#   and attention between the matmuls) gets less: 0.5.
# - 50 µs per layer: a decoder block at batch 1 runs about ten operators, each costing a few
#   µs of dispatch and thread-pool wake-up/barrier.
# No independent phone measurement separates the two runtimes, so they share the values.
# On the 2-core x86 host, onnxruntime decodes SmolLM2-135M fp32 in 25.5 ms/token (DESIGN.md
# §8); these defaults with the host's measured copy bandwidth (about 40 GB/s, relative to
# which 0.6 applies there) predict about 25 ms.
_DEFAULT_SOURCE = ("default for {}: a-priori estimate (bandwidth 0.6, compute 0.5, 50 µs/layer), "
                   "not measured; calibrate on the host with calibrate_efficiency()")
DEFAULT_EFFICIENCY = {
    (rt, be): Efficiency(0.6, 0.5, 50e-6, _DEFAULT_SOURCE.format(f"{rt}/{be}"))
    for rt, be in (("executorch", "xnnpack"), ("onnxruntime", "cpu"))
}


def default_efficiency(profile: DeviceProfile) -> Efficiency:
    key = (profile.runtime, profile.backend)
    if key not in DEFAULT_EFFICIENCY:
        raise ValueError(f"no default efficiency for {key[0]}/{key[1]} (profile {profile.name}); "
                         "pass one from calibrate_efficiency()")
    return DEFAULT_EFFICIENCY[key]


# ---------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class Prediction:
    beta: float
    ttft_s: float  # prefill of the prompt (encoders: one forward of prompt_tokens)
    decode_s_per_token: float | None  # at the prompt's length; None for encoders
    decode_bound: str | None  # "memory" or "compute"
    memory_bytes: float

    @property
    def decode_tokens_per_s(self) -> float | None:
        return None if self.decode_s_per_token is None else 1.0 / self.decode_s_per_token


def prefill_flops(cost: BudgetCost, prompt_tokens: int) -> float:
    """FLOPs of one forward pass over the prompt (the head only for its last token)."""
    return prompt_tokens * (cost.flops_per_token - cost.head_flops_per_token) \
        + cost.head_flops_per_token


def prefill_seconds(cost: BudgetCost, profile: DeviceProfile, eff: Efficiency,
                    prompt_tokens: int) -> float:
    compute = _value(profile.compute_gflops) * GB * eff.compute
    return prefill_flops(cost, prompt_tokens) / compute + cost.n_layers * eff.overhead_per_layer_s


def decode_seconds(cost: BudgetCost, profile: DeviceProfile, eff: Efficiency,
                   position: int) -> tuple[float, str]:
    """Seconds for one decoded token with `position` tokens already cached, and the bound."""
    read = cost.weight_bytes_per_token + cost.kv_bytes_per_token * position
    memory_s = read / (_value(profile.memory_bandwidth_gbps) * GB * eff.bandwidth)
    compute_s = cost.flops_per_token / (_value(profile.compute_gflops) * GB * eff.compute)
    bound = "memory" if memory_s >= compute_s else "compute"
    return max(memory_s, compute_s) + cost.n_layers * eff.overhead_per_layer_s, bound


def memory_bytes(cost: BudgetCost, profile: DeviceProfile, prompt_tokens: int) -> float:
    """Weights + the KV cache allocated for the profile's whole context + activations."""
    kv = 0.0 if cost.encoder else cost.kv_bytes_per_token * profile.context_tokens
    return cost.weight_bytes_total + kv + cost.activation_bytes_per_token * prompt_tokens


def predict(cost: BudgetCost, profile: DeviceProfile, efficiency: Efficiency | None = None,
            ) -> Prediction:
    """Predicted TTFT, decode time and memory of one budget on a profile (its prompt)."""
    profile = resolve_measured(profile)
    eff = efficiency or default_efficiency(profile)
    prompt = profile.targets.prompt_tokens
    ttft = prefill_seconds(cost, profile, eff, prompt)  # an encoder's whole forward pass
    decode, bound = (None, None) if cost.encoder else decode_seconds(cost, profile, eff, prompt)
    return Prediction(cost.beta, ttft, decode, bound, memory_bytes(cost, profile, prompt))


def calibrate_efficiency(measured_decode_s: float, measured_prefill_s: float, cost: BudgetCost,
                         host_profile: DeviceProfile, *, prompt_tokens: int | None = None,
                         overhead_per_layer_s: float | None = None) -> Efficiency:
    """Efficiency factors that make the model reproduce one host measurement: seconds per
    decoded token and seconds of prefill for `prompt_tokens` (default: the profile's).

    The per-layer overhead cannot be separated from bandwidth with one decode figure, so it
    is taken as given (default: the runtime's default) and subtracted. The host's compute
    and bandwidth are measured (what numpy reaches), not peak figures as on devices, so
    these factors are relative to achievable figures; on a device they predict on the fast
    side by the device's achievable/peak ratio.
    """
    profile = resolve_measured(host_profile)
    prompt = prompt_tokens or profile.targets.prompt_tokens
    overhead = overhead_per_layer_s if overhead_per_layer_s is not None \
        else default_efficiency(profile).overhead_per_layer_s
    fixed = cost.n_layers * overhead
    for name, value in (("measured_decode_s", measured_decode_s),
                        ("measured_prefill_s", measured_prefill_s)):
        if not value > fixed:
            raise ValueError(f"{name} = {value:.3g} s is not above the fixed overhead "
                             f"{fixed:.3g} s ({cost.n_layers} layers x {overhead:.3g} s); pass "
                             "a smaller overhead_per_layer_s or check the measurement")
    prefill_s = measured_prefill_s - fixed
    compute = prefill_flops(cost, prompt) / (_value(profile.compute_gflops) * GB * prefill_s)
    read = cost.weight_bytes_per_token + cost.kv_bytes_per_token * prompt
    bandwidth = read / (_value(profile.memory_bandwidth_gbps) * GB * (measured_decode_s - fixed))
    compute_s = cost.flops_per_token / (_value(profile.compute_gflops) * GB * compute)
    if compute_s > measured_decode_s - fixed:
        logger.warning("host decode looks compute-bound (%.3g s of matmul in %.3g s): the "
                       "bandwidth efficiency %.3g is only a lower bound", compute_s,
                       measured_decode_s, bandwidth)
    source = (f"calibrated on host {profile.name} ({profile.runtime}/{profile.backend}): decode "
              f"{measured_decode_s * 1e3:.3g} ms/token, prefill {measured_prefill_s:.3g} s for "
              f"{prompt} tokens, beta {cost.beta:g}")
    return Efficiency(bandwidth, compute, overhead, source)


def _value(q: Quantity) -> float:
    assert q.value is not None, "resolve_measured() must run before the model uses a profile"
    return q.value


# ---------------------------------------------------------------------------------------
# The host: measured, never looked up


@dataclass(frozen=True)
class HostMeasurement:
    key: str  # hostname-cpucount: a cache entry is only reused on the same machine
    compute_gflops: float
    memory_bandwidth_gbps: float
    ram_gb: float
    cpu_count: int


def host_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "flexrank" / "host.json"


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


# ---------------------------------------------------------------------------------------
# --budget auto


@dataclass(frozen=True)
class TargetCheck:
    target: str  # "decode", "TTFT", "memory", "latency"
    predicted: float
    limit: float
    unit: str
    at_least: bool  # the prediction must be >= limit (else <= limit)

    @property
    def passed(self) -> bool:
        slack = AT_TARGET_RTOL * self.limit
        return self.predicted >= self.limit - slack if self.at_least \
            else self.predicted <= self.limit + slack

    @property
    def margin(self) -> float:
        """Signed relative distance from the limit: (predicted − limit) / limit."""
        return (self.predicted - self.limit) / self.limit

    def describe(self) -> str:
        """E.g. 'decode 12.3 tok/s < target 20 tok/s (−38 %)'."""
        ops = ("≥", "<") if self.at_least else ("≤", ">")
        op = ops[0] if self.passed else ops[1]
        percent = f"{self.margin * 100:+.0f} %".replace("-", "−")
        return (f"{self.target} {self.predicted:.3g} {self.unit} {op} target "
                f"{self.limit:g} {self.unit} ({percent})")


@dataclass(frozen=True)
class BudgetRow:
    prediction: Prediction
    checks: tuple[TargetCheck, ...]

    @property
    def beta(self) -> float:
        return self.prediction.beta

    @property
    def fits(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> tuple[TargetCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)


@dataclass(frozen=True)
class Decision:
    """The largest budget meeting every target of a profile, with the evidence."""

    profile: DeviceProfile
    beta: float | None  # None when no budget fits
    rows: tuple[BudgetRow, ...]  # largest budget first
    efficiency: Efficiency
    explanation: str

    def table(self) -> str:
        p, t = self.profile, self.profile.targets
        lines = [f"Predicted on {p.name} ({p.tier}; {p.runtime}/{p.backend}, {p.threads} "
                 f"threads). Efficiency: {self.efficiency.source}.",
                 f"Targets: decode >= {t.decode_tokens_per_s:g} tok/s, TTFT <= {t.ttft_s:g} s "
                 f"for {t.prompt_tokens} prompt tokens, memory <= "
                 f"{_value(p.model_memory_gb):g} GB (KV cache for {p.context_tokens} tokens)."]
        names = [c.target for c in self.rows[0].checks] if self.rows else []
        header = ["beta", *[f"{n} {c.unit}" for n, c in zip(names, self.rows[0].checks,
                                                             strict=True)], "fits"]
        body = [[f"{r.beta:g}",
                 *[f"{c.predicted:.3g} {'ok' if c.passed else 'FAIL'}" for c in r.checks],
                 "yes" if r.fits else "no"] for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        for row in [header, *body]:
            lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        chosen = "none" if self.beta is None else f"beta {self.beta:g}"
        lines.append(f"Chosen: {chosen}. {self.explanation}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-serialisable; every figure is a prediction of the latency model."""
        p, t = self.profile, self.profile.targets
        return {
            "label": "predicted",
            "profile": p.name, "tier": p.tier, "runtime": p.runtime, "backend": p.backend,
            "threads": p.threads, "chosen_beta": self.beta, "explanation": self.explanation,
            "efficiency": asdict(self.efficiency),
            "targets": {"decode_tokens_per_s": t.decode_tokens_per_s, "ttft_s": t.ttft_s,
                        "prompt_tokens": t.prompt_tokens,
                        "encoder_latency_ms": t.encoder_latency_ms,
                        "model_memory_gb": _value(p.model_memory_gb),
                        "context_tokens": p.context_tokens},
            "budgets": [{
                "beta": r.beta, "fits": r.fits,
                "ttft_s": r.prediction.ttft_s,
                "decode_tokens_per_s": r.prediction.decode_tokens_per_s,
                "decode_bound": r.prediction.decode_bound,
                "memory_gb": r.prediction.memory_bytes / GB,
                "checks": {c.target: {"predicted": c.predicted, "limit": c.limit,
                                      "unit": c.unit, "passed": c.passed, "margin": c.margin}
                           for c in r.checks},
            } for r in self.rows],
        }


def check_targets(prediction: Prediction, profile: DeviceProfile, encoder: bool = False,
                  ) -> tuple[TargetCheck, ...]:
    t = profile.targets
    memory = TargetCheck("memory", prediction.memory_bytes / GB, _value(profile.model_memory_gb),
                         "GB", at_least=False)
    if encoder:
        if t.encoder_latency_ms is None:
            raise ValueError(f"profile {profile.name} ({profile.path or 'in memory'}) has no "
                             "targets.encoder_latency_ms, needed for an encoder model; add one")
        return (TargetCheck("latency", prediction.ttft_s * 1e3, t.encoder_latency_ms, "ms",
                            at_least=False), memory)
    return (TargetCheck("decode", prediction.decode_tokens_per_s, t.decode_tokens_per_s,
                        "tok/s", at_least=True),
            TargetCheck("TTFT", prediction.ttft_s, t.ttft_s, "s", at_least=False),
            memory)


def choose_budget(costs: list[BudgetCost], profile: DeviceProfile | str,
                  efficiency: Efficiency | None = None) -> Decision:
    """Pick the largest budget whose predicted latency and memory meet every target."""
    if not costs:
        raise ValueError("choose_budget needs at least one BudgetCost")
    betas = [c.beta for c in costs]
    if len(set(betas)) != len(betas):
        raise ValueError(f"duplicate budgets in {sorted(betas, reverse=True)}; give each once")
    if len({c.encoder for c in costs}) > 1:
        raise ValueError("costs mix encoder and decoder budgets; pass one model's budgets")
    profile = resolve_measured(load_profile(profile) if isinstance(profile, str) else profile)
    eff = efficiency or default_efficiency(profile)
    rows = []
    for cost in sorted(costs, key=lambda c: c.beta, reverse=True):
        prediction = predict(cost, profile, eff)
        rows.append(BudgetRow(prediction, check_targets(prediction, profile, cost.encoder)))
    fitting = [r for r in rows if r.fits]
    chosen = fitting[0] if fitting else None
    return Decision(profile, chosen.beta if chosen else None, tuple(rows), eff,
                    _explain(rows, chosen, profile.name))


def _explain(rows: list[BudgetRow], chosen: BudgetRow | None, name: str) -> str:
    if chosen is None:
        smallest = rows[-1]
        fails = "; ".join(c.describe() for c in smallest.failures)
        return (f"No budget meets every target on {name}. Even the smallest, beta "
                f"{smallest.beta:g}, fails: {fails}. Offer smaller budgets, use a faster "
                "runtime or relax the profile's targets.")
    meets = ", ".join(c.describe() for c in chosen.checks)
    index = rows.index(chosen)
    if index == 0:
        return f"Beta {chosen.beta:g}, the largest budget offered, meets every target on " \
               f"{name}: {meets}."
    larger = rows[index - 1]
    fails = "; ".join(c.describe() for c in larger.failures)
    return (f"Beta {chosen.beta:g} is the largest budget that meets every target on {name}: "
            f"{meets}. The next larger, beta {larger.beta:g}, fails: {fails}.")


# ---------------------------------------------------------------------------------------
# Decoder costs from a shape, and the published measurements the model is checked against


@dataclass(frozen=True)
class DecoderShape:
    name: str
    n_params: float  # whole model, a tied embedding counted once
    n_layers: int
    hidden: int
    intermediate: int  # MLP inner size
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool


LLAMA_3_2_1B = DecoderShape("Llama 3.2 1B", 1.24e9, 16, 2048, 8192, 8, 64, 128256, tied=True)
SMOLLM2_135M = DecoderShape("SmolLM2-135M", 134.5e6, 30, 576, 1536, 3, 64, 49152, tied=True)


def decoder_cost(shape: DecoderShape, *, beta: float = 1.0, weight_bits: float = 32,
                 head_bits: float | None = None, embedding_bits: float | None = None,
                 kv_bits: float = 32, full_logits: bool = True) -> BudgetCost:
    """The cost of a decoder whose block linears keep a fraction `beta` of their
    parameters (embeddings and lm_head untouched, as FlexRank does by default).

    `weight_bits` for block linears (4.5 for 4-bit groups of 32 with a 16-bit scale),
    `head_bits` and `embedding_bits` default to it; `full_logits=False` when the export
    computes logits for the last prompt token only. Norm weights count as block weights.
    """
    head_bits = weight_bits if head_bits is None else head_bits
    embedding_bits = weight_bits if embedding_bits is None else embedding_bits
    table = shape.vocab * shape.hidden
    block = (shape.n_params - table * (1 if shape.tied else 2)) * beta
    stored_once = shape.tied and head_bits == embedding_bits
    # live per prompt token: residual, normed input, q/k/v/attention out, gate, up (fp32)
    activations = (6 * shape.hidden + 2 * shape.intermediate) * 4
    if full_logits:
        activations += shape.vocab * 4
    return BudgetCost(
        beta=beta,
        flops_per_token=2 * (block + table),
        weight_bytes_per_token=(block * weight_bits + table * head_bits
                                + shape.hidden * embedding_bits) / 8,
        weight_bytes_total=(block * weight_bits + table * head_bits
                            + (0 if stored_once else table * embedding_bits)) / 8,
        kv_bytes_per_token=2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * kv_bits / 8,
        n_layers=shape.n_layers,
        activation_bytes_per_token=activations,
        head_flops_per_token=0.0 if full_logits else 2 * table)


@dataclass(frozen=True)
class PublishedPoint:
    label: str
    profile: str  # shipped profile of the device (its prompt is the measurement's)
    cost: BudgetCost
    metric: str  # "decode_tokens_per_s", "prefill_tokens_per_s" or "memory_gb"
    published: float
    source: str


@dataclass(frozen=True)
class PublishedCheck:
    point: PublishedPoint
    predicted: float

    @property
    def ratio(self) -> float:
        """predicted / published."""
        return self.predicted / self.point.published


_ET_LLAMA = ("ExecuTorch examples/models/llama/README.md, Llama 3.2 1B BF16 baseline on "
             "OnePlus 12 (adb binary, prompt length 64)")
# ExecuTorch's Llama export keeps a BF16 KV cache and returns the last logits only.
_LLAMA_BF16 = decoder_cost(LLAMA_3_2_1B, weight_bits=16, kv_bits=16, full_logits=False)
# optimum-executorch 8da4w: 4-bit weights in groups of 32 with a 16-bit scale (4.5 bits) on
# every linear including lm_head, 8-bit embedding, fp32 KV cache.
_SMOLLM2_8DA4W = decoder_cost(SMOLLM2_135M, weight_bits=4.5, embedding_bits=8, kv_bits=32,
                              full_logits=False)
PUBLISHED = (
    PublishedPoint("OnePlus 12, Llama 3.2 1B BF16, ExecuTorch: decode", "oneplus12",
                   _LLAMA_BF16, "decode_tokens_per_s", 19.2, _ET_LLAMA),
    PublishedPoint("OnePlus 12, Llama 3.2 1B BF16, ExecuTorch: prefill", "oneplus12",
                   _LLAMA_BF16, "prefill_tokens_per_s", 60.3, _ET_LLAMA),
    # RSS 3,185 MB in the same table (MB there = MiB: its PTE size, 2,358 MB, is the BF16
    # weights in MiB); RSS also counts the runtime, so the model predicts low here.
    PublishedPoint("OnePlus 12, Llama 3.2 1B BF16, ExecuTorch: memory (RSS)", "oneplus12",
                   _LLAMA_BF16, "memory_gb", 3185 * MIB / GB, _ET_LLAMA),
    PublishedPoint("Galaxy S22, SmolLM2-135M 8da4w, ExecuTorch: decode", "galaxy-s22",
                   _SMOLLM2_8DA4W, "decode_tokens_per_s", 202.0,
                   "optimum-executorch README, SmolLM2-135M 8da4w on Samsung Galaxy S22"),
)


def check_published(efficiency: Efficiency | None = None) -> list[PublishedCheck]:
    """The model's prediction for every published measurement (default efficiencies of
    each profile's runtime unless `efficiency` is given)."""
    checks = []
    for point in PUBLISHED:
        profile = load_profile(point.profile)
        prediction = predict(point.cost, profile, efficiency)
        predicted = {
            "decode_tokens_per_s": prediction.decode_tokens_per_s,
            "prefill_tokens_per_s": profile.targets.prompt_tokens / prediction.ttft_s,
            "memory_gb": prediction.memory_bytes / GB,
        }[point.metric]
        checks.append(PublishedCheck(point, predicted))
    return checks


def published_table(checks: list[PublishedCheck] | None = None) -> str:
    checks = check_published() if checks is None else checks
    lines = [f"{'measurement':58} {'published':>10} {'predicted':>10} {'ratio':>6}"]
    for c in checks:
        lines.append(f"{c.point.label:58} {c.point.published:10.3g} {c.predicted:10.3g} "
                     f"{c.ratio:6.2f}")
    return "\n".join(lines)
