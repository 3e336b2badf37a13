"""Baselines at the same deployed parameter count: one kept-rank fraction for every layer
(plain SVD or DataSVD, no planning, no training), the ASVD/SVD-LLM recipe."""

from __future__ import annotations

from collections.abc import Sequence

from flexrank.planning.costs import gauge_fixed_params


def uniform_ranks(shapes: Sequence[tuple[int, int]], beta: float, multiple: int = 1,
                  ) -> list[int]:
    """The largest common rank fraction f with Σ params(round(f·min(m, n))) ≤ β·dense.

    Ranks are rounded down to `multiple` (at least `multiple`, at most full rank), so the
    baseline never spends more parameters than the budget allows."""
    if not 0 < beta <= 1:
        raise ValueError(f"budget {beta} is out of range (0, 1]")
    dense = sum(m * n for m, n in shapes)

    def ranks_at(fraction: float) -> list[int]:
        out = []
        for m, n in shapes:
            full = min(m, n)
            r = int(fraction * full) // multiple * multiple
            out.append(min(full, max(multiple, r)))
        return out

    def cost(fraction: float) -> int:
        return sum(gauge_fixed_params(m, n, r) for (m, n), r in
                   zip(shapes, ranks_at(fraction), strict=True))

    low, high = 0.0, 1.0
    if cost(high) <= beta * dense:
        return ranks_at(high)
    for _ in range(60):  # bisection on the fraction
        mid = (low + high) / 2
        if cost(mid) <= beta * dense:
            low = mid
        else:
            high = mid
    return ranks_at(low)
