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

Encoders and vision models (one forward per input, no decode) are priced per inference
from the work of one forward pass, counted with forward hooks at the budget's ranks
(`flexrank.compress.inference_cost`; `BudgetCost.inference_*`), by the same roofline:

    inference = max(F_inf / (C × e_c), B_inf / (W × e_w)) + L × o

F_inf: FLOPs of one input (2 × multiply-adds of every linear, conv and attention: a conv's
scale with its output's H·W), B_inf: bytes of its weights (as deployed) plus the
activations its kernels read and write. A text encoder's work was counted at
`inference_tokens` T₀; at the profile's prompt_tokens T it is rescaled exactly as the
kernels scale, with s = T / T₀: attention's part by s², the weights not at all, the rest
by s. Costs without a count (older manifests) fall back to a prefill of the prompt.

Quantized kernels that multiply int8 by int8 have a higher compute peak than fp32
(`Efficiency.compute_scale`). Known limit: decode is predicted at the prompt's length,
not at a full context.
Device numbers from here are predictions; only the host's numbers are ever measured.
`check_published()` compares the model with published phone measurements.
"""


from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from flexrank.device.host import resolve_measured
from flexrank.device.profiles import DeviceProfile, Quantity
from flexrank.planning.costs import BudgetCost

logger = logging.getLogger(__name__)

GB = 1e9  # profiles use decimal units


@dataclass(frozen=True)
class Efficiency:
    """What a runtime reaches of a profile's peak figures, at one precision."""

    bandwidth: float  # fraction of memory_bandwidth_gbps reached while streaming weights
    compute: float  # fraction of the precision's peak (compute_gflops × compute_scale)
    overhead_per_layer_s: float  # fixed cost per layer and forward pass: dispatch, thread sync
    source: str
    # Peak multiply-add rate of the precision's kernels against fp32 FMA on the same cores:
    # 1 for float; 4 for kernels that multiply int8 activations by int8 (or unpacked int4)
    # weights with dot-product instructions (Arm SDOT / x86 VNNI: four int8 products per
    # 32-bit lane where an fp32 FMA makes one; Arm Architecture Reference Manual, SDOT).
    compute_scale: float = 1.0

    def __post_init__(self):
        for name in ("bandwidth", "compute", "compute_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Efficiency.{name} = {value} must be a positive number")
        for name in ("bandwidth", "compute"):
            value = getattr(self, name)
            if value > 1:
                logger.warning("Efficiency.%s = %.3g is above 1: the runtime beats the profile's "
                               "figure (%s)", name, value, self.source)
        if not (math.isfinite(self.overhead_per_layer_s) and self.overhead_per_layer_s >= 0):
            raise ValueError(f"Efficiency.overhead_per_layer_s = {self.overhead_per_layer_s} "
                             "must be >= 0")

    @property
    def compute_factor(self) -> float:
        """Multiplies the profile's fp32 peak: compute × compute_scale."""
        return self.compute * self.compute_scale


# Nominal bits per block weight of each precision the runtimes ship (onnxruntime: fp32,
# int8, int4 MatMulNBits; ExecuTorch/XNNPACK: fp32, 8da4w); the exact bytes of a budget come
# from its BudgetCost. Also the order "higher precision first" of the decision table.
PRECISION_BITS = {"fp32": 32, "int8": 8, "int4": 5, "8da4w": 5}


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
#
# Quantized precisions (a priori too, then checked against ExecuTorch's published 4-bit
# points and the host's measurements: BENCHMARKS.md, "The decision over β × precision"):
# 8da4w (XNNPACK qd8-f32-qc4w) and onnxruntime's int4 MatMulNBits at accuracy level 4 and
# dynamic int8 all quantize the activations to int8 and multiply with int8 dot products, so
# their compute peak is 4x fp32 (compute_scale 4) at the same 0.5 kernel efficiency. The
# bandwidth factor stays 0.6: Arm's 4-bit kernels unpack nibbles in registers while the
# next weights stream in (the published 4-bit decode rates are memory-bound at that factor).
# On the x86 host the quantized kernels reach other fractions (measured:
# `HOST_PRECISION_FACTORS`, applied on the host tier).
_DEFAULT_SOURCE = ("default for {}: a-priori estimate (bandwidth 0.6, compute 0.5, 50 µs/layer), "
                   "not measured; calibrate on the host with calibrate_efficiency()")
_QUANT_SOURCE = ("default for {}: a-priori estimate (bandwidth 0.6, compute 0.5 of an int8 "
                 "dot-product peak 4x fp32, 50 µs/layer)")
DEFAULT_EFFICIENCY = {
    (rt, be): Efficiency(0.6, 0.5, 50e-6, _DEFAULT_SOURCE.format(f"{rt}/{be}"))
    for rt, be in (("executorch", "xnnpack"), ("onnxruntime", "cpu"))
}
QUANTIZED_EFFICIENCY = {
    (rt, be, prec): Efficiency(0.6, 0.5, 50e-6, _QUANT_SOURCE.format(f"{rt}/{be} {prec}"),
                               compute_scale=4.0)
    for rt, be, prec in (("executorch", "xnnpack", "8da4w"), ("onnxruntime", "cpu", "int8"),
                         ("onnxruntime", "cpu", "int4"))
}
# Measured on the 2-core x86 host (AVX-512 VNNI), SmolLM2-135M β = 1, 2 threads, each
# precision's runs interleaved with fp32's in one process; BENCHMARKS.md, "The decision
# over β × precision (issue 17)". (bandwidth factor, compute factor) relative to fp32's:
# bandwidth = bytes ratio × fp32 decode time / decode time; compute = fp32 prefill time /
# prefill time. onnxruntime: benchmarks/bench_precision.py (a loaded host); ExecuTorch:
# benchmarks/bench_executorch.py's 8da4w and fp32 programs (BENCHMARKS.md, issues 6 and 5).
# Used for the host tier only: x86 kernels do not hide the 4-bit unpacking at batch 1 and
# get little from int8 in prefill, so these do not transfer to Arm phones (the published
# 4-bit points are met by the a-priori factors above, not by these: BENCHMARKS.md).
HOST_PRECISION_FACTORS: dict[tuple[str, str], tuple[float, float]] = {
    ("onnxruntime", "int8"): (0.84, 1.73),
    ("onnxruntime", "int4"): (0.83, 0.80),
    ("executorch", "8da4w"): (0.48, 1.52),
}


def default_efficiency(profile: DeviceProfile) -> Efficiency:
    key = (profile.runtime, profile.backend)
    if key not in DEFAULT_EFFICIENCY:
        raise ValueError(f"no default efficiency for {key[0]}/{key[1]} (profile {profile.name}); "
                         "pass one from calibrate_efficiency()")
    return DEFAULT_EFFICIENCY[key]


def efficiency_for(profile: DeviceProfile, precision: str = "fp32") -> Efficiency:
    """The runtime's efficiency at `precision` on `profile` (on the host tier, with the
    bandwidth factor measured there for quantized kernels)."""
    base = default_efficiency(profile)
    if precision == "fp32":
        return base
    key = (profile.runtime, profile.backend, precision)
    if key not in QUANTIZED_EFFICIENCY:
        raise ValueError(f"{profile.runtime}/{profile.backend} does not run {precision} "
                         f"(profile {profile.name}); choose one of its precisions")
    eff = QUANTIZED_EFFICIENCY[key]
    measured = HOST_PRECISION_FACTORS.get((profile.runtime, precision))
    if profile.tier == "host" and measured is not None:
        bandwidth, compute = measured
        eff = Efficiency(base.bandwidth * bandwidth, base.compute, base.overhead_per_layer_s,
                         f"host {profile.runtime} {precision}: bandwidth {bandwidth:.3g} x and "
                         f"compute {compute:.3g} x fp32's, measured on the x86 host",
                         compute_scale=compute)
    return eff


# ---------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class Prediction:
    beta: float
    ttft_s: float  # prefill of the prompt (encoders: one forward of prompt_tokens)
    decode_s_per_token: float | None  # at the prompt's length; None for encoders
    decode_bound: str | None  # "memory" or "compute"
    memory_bytes: float

    inference_bound: str | None = None  # encoders priced per inference: "memory"/"compute"

    @property
    def decode_tokens_per_s(self) -> float | None:
        return None if self.decode_s_per_token is None else 1.0 / self.decode_s_per_token


def prefill_flops(cost: BudgetCost, prompt_tokens: int) -> float:
    """FLOPs of one forward pass over the prompt (the head only for its last token)."""
    return prompt_tokens * (cost.flops_per_token - cost.head_flops_per_token) \
        + cost.head_flops_per_token


def prefill_seconds(cost: BudgetCost, profile: DeviceProfile, eff: Efficiency,
                    prompt_tokens: int) -> float:
    compute = value_of(profile.compute_gflops) * GB * eff.compute_factor
    return prefill_flops(cost, prompt_tokens) / compute + cost.n_layers * eff.overhead_per_layer_s


def decode_seconds(cost: BudgetCost, profile: DeviceProfile, eff: Efficiency,
                   position: int) -> tuple[float, str]:
    """Seconds for one decoded token with `position` tokens already cached, and the bound."""
    read = cost.weight_bytes_per_token + cost.kv_bytes_per_token * position
    memory_s = read / (value_of(profile.memory_bandwidth_gbps) * GB * eff.bandwidth)
    compute_s = cost.flops_per_token / (value_of(profile.compute_gflops) * GB
                                        * eff.compute_factor)
    bound = "memory" if memory_s >= compute_s else "compute"
    return max(memory_s, compute_s) + cost.n_layers * eff.overhead_per_layer_s, bound


def inference_work(cost: BudgetCost, tokens: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one inference of an input of `tokens` tokens (ignored for an image:
    `inference_tokens` 0), from the counted work (module docstring). Raises ValueError for
    a cost without a count (`inference_flops` 0) or `tokens` < 1 for a text input."""
    if not cost.inference_flops:
        raise ValueError(f"BudgetCost beta {cost.beta:g} has no counted inference (its "
                         "inference_flops is 0): count it with flexrank.compress.budget_cost")
    if not cost.inference_tokens:
        return cost.inference_flops, cost.inference_bytes
    if tokens < 1:
        raise ValueError(f"tokens = {tokens} must be >= 1 for a text encoder's inference")
    s = tokens / cost.inference_tokens
    attention = cost.inference_attention_flops
    flops = (cost.inference_flops - attention) * s + attention * s * s
    fixed, quadratic = cost.inference_weight_bytes, cost.inference_attention_bytes
    linear = cost.inference_bytes - fixed - quadratic
    return flops, fixed + linear * s + quadratic * s * s


def inference_seconds(cost: BudgetCost, profile: DeviceProfile, eff: Efficiency,
                      tokens: int) -> tuple[float, str]:
    """Seconds for one inference (batch 1) of an encoder or vision model, and the bound
    ("memory" or "compute"): the roofline of the module docstring over the counted work.
    `profile` must be resolved (`resolve_measured`); raises ValueError as `inference_work`."""
    flops, read = inference_work(cost, tokens)
    compute_s = flops / (value_of(profile.compute_gflops) * GB * eff.compute_factor)
    memory_s = read / (value_of(profile.memory_bandwidth_gbps) * GB * eff.bandwidth)
    bound = "memory" if memory_s >= compute_s else "compute"
    return max(compute_s, memory_s) + cost.n_layers * eff.overhead_per_layer_s, bound


def memory_bytes(cost: BudgetCost, profile: DeviceProfile, prompt_tokens: int) -> float:
    """Weights + the KV cache allocated for the profile's whole context + activations."""
    kv = 0.0 if cost.encoder else cost.kv_bytes_per_token * profile.context_tokens
    return cost.weight_bytes_total + kv + cost.activation_bytes_per_token * prompt_tokens


def predict(cost: BudgetCost, profile: DeviceProfile, efficiency: Efficiency | None = None,
            ) -> Prediction:
    """Predicted TTFT, decode time and memory of one budget on a profile (its prompt); for
    an encoder or vision model with a counted inference, the latency of one inference (in
    `ttft_s`) at the profile's prompt_tokens (text) or the counted image."""
    profile = resolve_measured(profile)
    eff = efficiency or default_efficiency(profile)
    prompt = profile.targets.prompt_tokens
    if cost.encoder and cost.inference_flops:  # priced per inference from its counted work
        latency, bound = inference_seconds(cost, profile, eff, prompt)
        return Prediction(cost.beta, latency, None, None, memory_bytes(cost, profile, prompt),
                          bound)
    ttft = prefill_seconds(cost, profile, eff, prompt)  # an encoder's whole forward pass
    decode, bound = (None, None) if cost.encoder else decode_seconds(cost, profile, eff, prompt)
    return Prediction(cost.beta, ttft, decode, bound, memory_bytes(cost, profile, prompt))


def calibrate_efficiency(measured_decode_s: float, measured_prefill_s: float, cost: BudgetCost,
                         host_profile: DeviceProfile, *, prompt_tokens: int | None = None,
                         overhead_per_layer_s: float | None = None,
                         compute_scale: float = 1.0) -> Efficiency:
    """Efficiency factors that make the model reproduce one host measurement: seconds per
    decoded token and seconds of prefill for `prompt_tokens` (default: the profile's).

    The per-layer overhead cannot be separated from bandwidth with one decode figure, so it
    is taken as given (default: the runtime's default) and subtracted. The host's compute
    and bandwidth are measured (what numpy reaches), not peak figures as on devices, so
    these factors are relative to achievable figures; on a device they predict on the fast
    side by the device's achievable/peak ratio. `compute_scale`: the precision's peak
    against fp32 (`Efficiency.compute_scale`).
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
    compute = prefill_flops(cost, prompt) / (value_of(profile.compute_gflops) * GB * prefill_s
                                             * compute_scale)
    read = cost.weight_bytes_per_token + cost.kv_bytes_per_token * prompt
    bandwidth = read / (value_of(profile.memory_bandwidth_gbps) * GB * (measured_decode_s - fixed))
    compute_s = cost.flops_per_token / (value_of(profile.compute_gflops) * GB * compute
                                        * compute_scale)
    if compute_s > measured_decode_s - fixed:
        logger.warning("host decode looks compute-bound (%.3g s of matmul in %.3g s): the "
                       "bandwidth efficiency %.3g is only a lower bound", compute_s,
                       measured_decode_s, bandwidth)
    source = (f"calibrated on host {profile.name} ({profile.runtime}/{profile.backend}): decode "
              f"{measured_decode_s * 1e3:.3g} ms/token, prefill {measured_prefill_s:.3g} s for "
              f"{prompt} tokens, beta {cost.beta:g}")
    return Efficiency(bandwidth, compute, overhead, source, compute_scale)


def value_of(q: Quantity) -> float:
    assert q.value is not None, "resolve_measured() must run before the model uses a profile"
    return q.value


