"""Decoder costs from a published shape, and the published phone measurements that the
roofline model of `flexrank.device.predict` is checked against (`check_published`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flexrank.device.predict import Efficiency, efficiency_for, predict
from flexrank.device.profiles import load_profile
from flexrank.planning.costs import BudgetCost

logger = logging.getLogger(__name__)

GB = 1e9  # profiles use decimal units
MIB = 2**20


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
    precision: str = "fp32"  # whose efficiency predicts it (`efficiency_for`)


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
_ET_SPINQUANT = ("ExecuTorch examples/models/llama/README.md (and Meta's Llama 3.2 1B model "
                 "card), Llama 3.2 1B SpinQuant on OnePlus 12 (adb binary, prompt length 64; "
                 "PTE 1083 MB)")
# ExecuTorch's Llama export keeps a BF16 KV cache and returns the last logits only.
_LLAMA_BF16 = decoder_cost(LLAMA_3_2_1B, weight_bits=16, kv_bits=16, full_logits=False)
# optimum-executorch 8da4w: 4-bit weights in groups of 32 with a 16-bit scale (4.5 bits) on
# every linear including lm_head, 8-bit embedding, fp32 KV cache.
_SMOLLM2_8DA4W = decoder_cost(SMOLLM2_135M, weight_bits=4.5, embedding_bits=8, kv_bits=32,
                              full_logits=False)
# SpinQuant as ExecuTorch exports it: 4-bit weights in groups of 32 (4.5 bits with the
# 16-bit scale) with int8 dynamic activations on every block linear, the embedding and the
# output layer in 8 bits per channel, stored apart (1083 MB: 547 + 263 + 263 MB).
_LLAMA_SPINQUANT = decoder_cost(LLAMA_3_2_1B, weight_bits=4.5, head_bits=8, embedding_bits=8,
                                kv_bits=32, full_logits=False)
PUBLISHED = (
    PublishedPoint("OnePlus 12, Llama 3.2 1B BF16, ExecuTorch: decode", "oneplus12",
                   _LLAMA_BF16, "decode_tokens_per_s", 19.2, _ET_LLAMA),
    PublishedPoint("OnePlus 12, Llama 3.2 1B BF16, ExecuTorch: prefill", "oneplus12",
                   _LLAMA_BF16, "prefill_tokens_per_s", 60.3, _ET_LLAMA),
    # RSS 3,185 MB in the same table (MB there = MiB: its PTE size, 2,358 MB, is the BF16
    # weights in MiB); RSS also counts the runtime, so the model predicts low here.
    PublishedPoint("OnePlus 12, Llama 3.2 1B BF16, ExecuTorch: memory (RSS)", "oneplus12",
                   _LLAMA_BF16, "memory_gb", 3185 * MIB / GB, _ET_LLAMA),
    PublishedPoint("OnePlus 12, Llama 3.2 1B SpinQuant 4-bit, ExecuTorch: decode", "oneplus12",
                   _LLAMA_SPINQUANT, "decode_tokens_per_s", 50.2, _ET_SPINQUANT, "8da4w"),
    PublishedPoint("OnePlus 12, Llama 3.2 1B SpinQuant 4-bit, ExecuTorch: prefill",
                   "oneplus12", _LLAMA_SPINQUANT, "prefill_tokens_per_s", 260.5, _ET_SPINQUANT,
                   "8da4w"),
    PublishedPoint("Galaxy S22, SmolLM2-135M 8da4w, ExecuTorch: decode", "galaxy-s22",
                   _SMOLLM2_8DA4W, "decode_tokens_per_s", 202.0,
                   "optimum-executorch README, SmolLM2-135M 8da4w on Samsung Galaxy S22",
                   "8da4w"),
)


def check_published(efficiency: Efficiency | None = None) -> list[PublishedCheck]:
    """The model's prediction for every published measurement (the efficiency of each
    profile's runtime at the point's precision unless `efficiency` is given)."""
    checks = []
    for point in PUBLISHED:
        profile = load_profile(point.profile)
        prediction = predict(point.cost, profile,
                             efficiency or efficiency_for(profile, point.precision))
        predicted = {
            "decode_tokens_per_s": prediction.decode_tokens_per_s,
            "prefill_tokens_per_s": profile.targets.prompt_tokens / prediction.ttft_s,
            "memory_gb": prediction.memory_bytes / GB,
        }[point.metric]
        checks.append(PublishedCheck(point, predicted))
    return checks


def published_table(checks: list[PublishedCheck] | None = None) -> str:
    checks = check_published() if checks is None else checks
    lines = [f"{'measurement':66} {'published':>10} {'predicted':>10} {'ratio':>6}"]
    for c in checks:
        lines.append(f"{c.point.label:66} {c.point.published:10.3g} {c.predicted:10.3g} "
                     f"{c.ratio:6.2f}")
    return "\n".join(lines)
