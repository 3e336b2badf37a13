"""Cost models for the planner: what one layer costs at rank r.

A cost model is a small frozen dataclass with a `name` and `__call__(m, n, r) -> float`
for a layer with weight m x n (out x in) kept at rank r. Budgets are fractions of the
dense total sum_l cost(m_l, n_l, min(m_l, n_l)), so beta = 1 is the original model.

- `ParamsCost` (default): deployed parameters of a gauge-fixed rank-r layer, r(m + n - r)
  (DESIGN.md section 3; the identity block of U G is not stored). At r = min(m, n) this
  is exactly m*n: a layer at full rank is deployed dense.
- `FlopsCost`: multiply-adds per token, the same number (gauge-fixed forward: z = V^T x
  costs n r, the non-identity rows of U z cost (m - r) r). FLOPs are twice this; a
  constant factor changes no plan.
- `BytesCost`: parameters times bytes per element at a precision.
- `LatencyTable`: median onnxruntime times per (m, n, r), from `measure_latency_table`.

References: DESIGN.md sections 3, 4.4 and 4.6 (gauge fixing, measured latencies).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

BYTES_PER_ELEMENT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


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
    # The uncompressed model's resident weights at the same precision (0: not known), for
    # the whole-model fraction that tables show beside β (`whole_kept`).
    dense_weight_bytes_total: float = 0.0
    # One forward pass of one input, counted by forward hooks at this budget's ranks
    # (`flexrank.compress.inference_cost`; encoders and vision models): the device model
    # prices an inference from these (`flexrank.device.predict.inference_seconds`). 0: not
    # counted (older manifests), and the per-token figures above stand in.
    inference_flops: float = 0.0  # 2 × multiply-adds, attention's QKᵀ and AV included
    inference_attention_flops: float = 0.0  # the part in QKᵀ and AV: quadratic in tokens
    inference_bytes: float = 0.0  # weights read (as deployed) + activations read/written
    inference_weight_bytes: float = 0.0  # the weights' part: the same for any input size
    inference_attention_bytes: float = 0.0  # the attention scores' part: quadratic in tokens
    inference_tokens: int = 0  # tokens of the counted input (text); 0: a fixed-size image
    inference_input: str = ""  # what was counted, e.g. "pixel_values (1, 3, 224, 224)"

    @property
    def whole_kept(self) -> float | None:
        """Resident weights as a fraction of the uncompressed model's (None: not known).
        β caps the factorised layers' deployed parameters; this counts the whole model."""
        if not self.dense_weight_bytes_total:
            return None
        return self.weight_bytes_total / self.dense_weight_bytes_total

    def __post_init__(self):
        if not 0 < self.beta <= 1:
            raise ValueError(f"BudgetCost.beta = {self.beta} is out of range (0, 1]")
        for name in ("flops_per_token", "weight_bytes_per_token", "weight_bytes_total"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"BudgetCost.{name} = {value} must be positive (beta {self.beta})")
        for name in ("kv_bytes_per_token", "activation_bytes_per_token", "head_flops_per_token",
                     "dense_weight_bytes_total", "inference_flops", "inference_attention_flops",
                     "inference_bytes", "inference_weight_bytes", "inference_attention_bytes",
                     "inference_tokens"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"BudgetCost.{name} = {value} must be >= 0 (beta {self.beta})")
        if self.head_flops_per_token > self.flops_per_token:
            raise ValueError(f"BudgetCost.head_flops_per_token = {self.head_flops_per_token:g} "
                             f"exceeds flops_per_token = {self.flops_per_token:g}")
        if self.inference_attention_flops > self.inference_flops or \
                self.inference_weight_bytes + self.inference_attention_bytes \
                > self.inference_bytes * (1 + 1e-9):
            raise ValueError(f"BudgetCost (beta {self.beta}): the parts of one inference exceed "
                             f"its totals (flops {self.inference_flops:g}, of them attention "
                             f"{self.inference_attention_flops:g}; bytes "
                             f"{self.inference_bytes:g}, of them weights "
                             f"{self.inference_weight_bytes:g} and attention "
                             f"{self.inference_attention_bytes:g})")
        if self.n_layers < 1:
            raise ValueError(f"BudgetCost.n_layers = {self.n_layers} must be >= 1")


class CostModel(Protocol):
    name: str

    def __call__(self, m: int, n: int, r: int) -> float: ...


def check_rank(m: int, n: int, r: int) -> None:
    if m < 1 or n < 1 or not 0 <= r <= min(m, n):
        raise ValueError(f"rank {r} is out of range [0, {min(m, n)}] for a {m}x{n} layer")


def gauge_fixed_params(m: int, n: int, r: int) -> int:
    """Deployed parameters (= multiply-adds per token) of a gauge-fixed rank-r m x n layer,
    r(m + n - r): the one home of the budget's cost (DESIGN.md section 3).

    Never more than dense: m*n - r(m + n - r) = (m - r)(n - r) >= 0, equal at full rank.
    Raises ValueError for r outside [0, min(m, n)].
    """
    check_rank(m, n, r)
    return r * (m + n - r)


def plain_params(m: int, n: int, r: int) -> int:
    """Parameters (= multiply-adds per token) of plain factors U_r (m x r), V_r (n x r):
    (m + n) r, what the shared/elastic layouts and non-gauge-fixed layers store."""
    check_rank(m, n, r)
    return (m + n) * r


@dataclass(frozen=True)
class ParamsCost:
    """Deployed parameters r(m + n - r) (the default cost: DESIGN.md section 3)."""

    name: str = field(default="params", init=False)

    def __call__(self, m: int, n: int, r: int) -> float:
        return float(gauge_fixed_params(m, n, r))


@dataclass(frozen=True)
class FlopsCost:
    """Multiply-adds per token of the gauge-fixed layer (FLOPs = 2x; same plan)."""

    name: str = field(default="flops", init=False)

    def __call__(self, m: int, n: int, r: int) -> float:
        return float(gauge_fixed_params(m, n, r))


@dataclass(frozen=True)
class BytesCost:
    """Bytes of the deployed factors at `precision` (fp32, fp16, bf16, int8, int4)."""

    precision: str = "fp32"

    def __post_init__(self):
        if self.precision not in BYTES_PER_ELEMENT:
            raise ValueError(
                f"unknown precision {self.precision!r}; choose one of {sorted(BYTES_PER_ELEMENT)}"
            )

    @property
    def name(self) -> str:
        return f"bytes-{self.precision}"

    def __call__(self, m: int, n: int, r: int) -> float:
        return gauge_fixed_params(m, n, r) * BYTES_PER_ELEMENT[self.precision]


def cost_matrix(model: CostModel, shapes: Sequence[tuple[int, int]], ranks) -> np.ndarray:
    """(L, K) float64: cost of layer l at candidate rank ranks[l, k]."""
    return np.array([[model(m, n, int(r)) for r in row]
                     for (m, n), row in zip(shapes, ranks, strict=True)], dtype=np.float64)
