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
    compute = value_of(profile.compute_gflops) * GB * eff.compute
    return prefill_flops(cost, prompt_tokens) / compute + cost.n_layers * eff.overhead_per_layer_s


def decode_seconds(cost: BudgetCost, profile: DeviceProfile, eff: Efficiency,
                   position: int) -> tuple[float, str]:
    """Seconds for one decoded token with `position` tokens already cached, and the bound."""
    read = cost.weight_bytes_per_token + cost.kv_bytes_per_token * position
    memory_s = read / (value_of(profile.memory_bandwidth_gbps) * GB * eff.bandwidth)
    compute_s = cost.flops_per_token / (value_of(profile.compute_gflops) * GB * eff.compute)
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
    compute = prefill_flops(cost, prompt) / (value_of(profile.compute_gflops) * GB * prefill_s)
    read = cost.weight_bytes_per_token + cost.kv_bytes_per_token * prompt
    bandwidth = read / (value_of(profile.memory_bandwidth_gbps) * GB * (measured_decode_s - fixed))
    compute_s = cost.flops_per_token / (value_of(profile.compute_gflops) * GB * compute)
    if compute_s > measured_decode_s - fixed:
        logger.warning("host decode looks compute-bound (%.3g s of matmul in %.3g s): the "
                       "bandwidth efficiency %.3g is only a lower bound", compute_s,
                       measured_decode_s, bandwidth)
    source = (f"calibrated on host {profile.name} ({profile.runtime}/{profile.backend}): decode "
              f"{measured_decode_s * 1e3:.3g} ms/token, prefill {measured_prefill_s:.3g} s for "
              f"{prompt} tokens, beta {cost.beta:g}")
    return Efficiency(bandwidth, compute, overhead, source)


def value_of(q: Quantity) -> float:
    assert q.value is not None, "resolve_measured() must run before the model uses a profile"
    return q.value


