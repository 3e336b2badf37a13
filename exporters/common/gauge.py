"""Gauge fixing for deployment: a rank-r layer U Vᵀ with an identity block in U.

U Vᵀ = (U G)(V G⁻ᵀ)ᵀ for any invertible r×r G. With pivot rows P of U and G = U[P,:]⁻¹,
Û = U G is the identity on rows P, so only the other m − r rows are stored and the layer
costs (m + n − r)·r multiply-adds instead of (m + n)·r (never more than the dense m·n):

    z = V̂ᵀ x          (r,)       V̂ = V G⁻ᵀ = V U[P,:]ᵀ
    y[P] = z; y[rest] = Û[rest] z; y += bias

G depends on r, so gauge-fixed factors are made per budget (DESIGN.md §4.6).

Which form a layer is deployed in (`choose_form`), decided from onnxruntime times measured
on the 2-core x86 development host (2 threads, float32, one layer, median of 200 runs, µs;
batch 1 / batch 64):

    m×n       r    dense      plain      gauge      pivoted (Concat + Gather)
    576×576   288  15 / 168   14 / 169   14 / 131   16 / 217
    576×576   432  11 / 166   17 / 246   14 / 162   18 / 244
    1536×576  288  39 / 423   29 / 301   27 / 266   32 / 498
    1536×576  518  39 / 430   45 / 537   37 / 417   43 / 637
    576×1536  432  39 / 224   41 / 448   35 / 360   36 / 448

So:

- `dense` (one MatMul over U_r V_rᵀ) when r = min(m, n), i.e. β = 1 for that layer, or when
  the gauge-fixed cost is above `DENSE_FRACTION` of m·n: near full rank one big matmul
  beats two thin ones.
- `gauge` (leading rows as pivots, output = Concat(z, Û z), no reordering) when the leading
  r×r block of U is well conditioned (scale-free cond ≤ `MAX_CONDITION`): the float32 error
  of the identity trick grows with that condition number (DESIGN §4.6: 1e-3 at cond 5.6e3).
- `plain` (two MatMuls over V_r, U_r) otherwise, unless (m + n)·r is above
  `DENSE_FRACTION`·m·n (then dense). A *pivoted* gauge-fixed layer needs its
  output put back in order (Gather after Concat); onnxruntime copies the output for that
  and the layer ends up slower than plain factors (table above, batch 64), so the
  exporter never emits it; `gauge_fix(..., pivots="lu")` stays available for analysis.

The costs themselves live in `flexrank.planning.costs` (`gauge_fixed_params`, `plain_params`).

References: DESIGN.md §3 (budget counts r(m+n−r)), §4.6 (gauge fixing and its timings).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexrank.planning.costs import gauge_fixed_params, plain_params

# Factors are gauge-fixed in float64: G = U[P,:]⁻¹ amplifies rounding by cond(U[P,:]).
COMPUTE_DTYPE = torch.float64

# Leading blocks with a larger (scale-free) condition number fall back to plain factors.
# Measured on SmolLM2-135M (DataSVD, uniform plan, 210 layers; benchmarks/bench_onnx.py):
# at 1e4 the β = 0.5 and 0.75 exports validate (max |Δ logits| 6e-3 and 1e-2 of 30, 20
# greedy tokens equal to PyTorch's) with 196 and 198 layers gauge-fixed (1e3: 133 and 129,
# the rest plain or, near full rank, dense); at 1e5 validation fails (|Δ| 4.6e-3 > 1e-3 × 4.6
# on a KV-cache output).
MAX_CONDITION = 1e4

# Above this fraction of the dense m·n multiply-adds a dense matmul is faster than the
# gauge-fixed pair (measured: at r = 0.9·min(m, n) the pair is no faster than dense).
DENSE_FRACTION = 0.9


class LayerForm(enum.StrEnum):
    DENSE = "dense"
    GAUGE = "gauge"
    PLAIN = "plain"


@dataclass(frozen=True)
class GaugeFixed:
    """A gauge-fixed rank-r layer: y[pivots] = z, y[rest] = U_rest z, z = V_hatᵀ x."""

    V_hat: torch.Tensor  # (n, r)
    U_rest: torch.Tensor  # (m - r, r): the rows of U G that are not the identity
    pivots: torch.Tensor  # (r,) int64, output rows equal to z
    rest: torch.Tensor  # (m - r,) int64, the other output rows, ascending
    condition: float  # cond₂(U[P,:]) with unit columns (`block_condition`)

    @property
    def rank(self) -> int:
        return int(self.pivots.numel())

    @property
    def is_leading(self) -> bool:
        """Pivots are rows 0..r−1: the output needs no reordering."""
        return bool(torch.equal(self.pivots, torch.arange(self.rank)))

    def full_U(self) -> torch.Tensor:
        """U G (m, r): identity on the pivot rows."""
        m = self.rank + int(self.rest.numel())
        out = torch.zeros(m, self.rank, dtype=self.U_rest.dtype)
        out[self.pivots] = torch.eye(self.rank, dtype=self.U_rest.dtype)
        out[self.rest] = self.U_rest
        return out


def pivot_rows(U: torch.Tensor) -> torch.Tensor:
    """r pivot rows of a tall U (m, r) by LU with partial pivoting, float64."""
    P, _, _ = torch.linalg.lu(U.to(COMPUTE_DTYPE))
    perm = P.argmax(dim=0)  # U = P (L Û): row i of L Û is row perm[i] of U
    return perm[: U.shape[1]]


def block_condition(U_r: torch.Tensor, rows: torch.Tensor) -> float:
    """cond₂ of U_r[rows] with U_r's columns scaled to unit norm.

    Scaling the columns of U (U D, V D⁻¹: the same layer) leaves the gauge-fixed factors
    unchanged, U D (U[P] D)⁻¹ = U U[P]⁻¹, so only the scale-free condition number says how
    much rounding the gauge adds; DataSVD's U = P diag(√σ) would otherwise count √(σ₁/σ_r).
    """
    U_r = U_r.to(COMPUTE_DTYPE)
    unit = U_r / U_r.norm(dim=0).clamp_min(torch.finfo(COMPUTE_DTYPE).tiny)
    return float(torch.linalg.cond(unit[rows]))


def leading_condition(U: torch.Tensor, rank: int) -> float:
    """Condition of the leading r×r block of U[:, :r] (what a no-reorder gauge inverts)."""
    return block_condition(U[:, :rank], torch.arange(rank))


def gauge_fix(U: torch.Tensor, V: torch.Tensor, rank: int,
              pivots: str | torch.Tensor = "leading") -> GaugeFixed:
    """Gauge-fix the rank-`rank` prefix of U (m, R), V (n, R).

    `pivots`: "leading" (rows 0..r−1, no reordering), "lu" (partial-pivoting LU on U_r, the
    best-conditioned choice) or an explicit (r,) index tensor. Raises ValueError when the
    pivot block is singular.
    """
    m, n = U.shape[0], V.shape[0]
    if not 1 <= rank <= min(U.shape[1], m, n):
        raise ValueError(f"rank {rank} is out of range [1, {min(U.shape[1], m, n)}]")
    U_r = U[:, :rank].to(COMPUTE_DTYPE)
    V_r = V[:, :rank].to(COMPUTE_DTYPE)
    if isinstance(pivots, str):
        if pivots not in ("leading", "lu"):
            raise ValueError(f"pivots {pivots!r} is not 'leading', 'lu' or an index tensor")
        pivots = torch.arange(rank) if pivots == "leading" else pivot_rows(U_r)
    pivots = torch.as_tensor(pivots, dtype=torch.long)
    block = U_r[pivots]  # (r, r)
    condition = block_condition(U_r, pivots)
    if not condition < 1 / torch.finfo(COMPUTE_DTYPE).eps:
        raise ValueError(f"pivot block of U is singular (cond {condition:.3g}): "
                         "use plain factors for this layer")
    is_pivot = torch.zeros(m, dtype=torch.bool)
    is_pivot[pivots] = True
    rest = torch.nonzero(~is_pivot).flatten()
    U_rest = torch.linalg.solve(block.T, U_r[rest].T).T  # U_r[rest] G, (m − r, r)
    V_hat = V_r @ block.T  # V G⁻ᵀ with G⁻¹ = U[P,:], (n, r)
    return GaugeFixed(V_hat, U_rest, pivots, rest, condition)


def gauge_fixed_forward(x: torch.Tensor, fixed: GaugeFixed,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference forward of a gauge-fixed linear layer, x (..., n) → (..., m)."""
    z = x @ fixed.V_hat.to(x.dtype)  # (..., r)
    rest = z @ fixed.U_rest.to(x.dtype).T  # (..., m − r)
    y = x.new_empty(*x.shape[:-1], fixed.rank + rest.shape[-1])
    y[..., fixed.pivots] = z
    y[..., fixed.rest] = rest
    return y if bias is None else y + bias.to(x.dtype)


def choose_form(m: int, n: int, rank: int, condition: float | None = None,
                max_condition: float = MAX_CONDITION,
                dense_fraction: float = DENSE_FRACTION,
                latency: Callable[[int, int, int], float] | None = None) -> LayerForm:
    """How to deploy an m×n layer at `rank` (see the module docstring for the rule).

    `condition` is cond(U[:r,:r]) (`leading_condition`); None means "not known", and
    rules gauge fixing out. `latency(m, n, r)` (the planner's measured
    `flexrank.planning.latency_table.LatencyTable`: dense time at full rank, gauge-fixed time
    below) replaces the `dense_fraction` rule between dense and gauge-fixed when it has both
    entries.
    """
    full = min(m, n)
    if not 1 <= rank <= full:
        raise ValueError(f"rank {rank} is out of range [1, {full}] for a {m}x{n} layer")
    if rank == full:
        return LayerForm.DENSE
    well_conditioned = condition is not None and condition <= max_condition
    if latency is not None and well_conditioned:
        try:
            faster_dense = latency(m, n, full) <= latency(m, n, rank)
        except ValueError:  # not measured at this rank: fall back to the cost rule
            pass
        else:
            return LayerForm.DENSE if faster_dense else LayerForm.GAUGE
    if gauge_fixed_params(m, n, rank) > dense_fraction * m * n:
        return LayerForm.DENSE
    if well_conditioned:
        return LayerForm.GAUGE
    if plain_params(m, n, rank) > dense_fraction * m * n:
        return LayerForm.DENSE
    return LayerForm.PLAIN
