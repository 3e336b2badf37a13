"""Ranks rounded to a quantizer's group (ExecuTorch 8da4w) or block (onnxruntime int4):
a low-rank layer's second MatMul has the rank as its inner width, and a width that is not
a multiple of the group is padded, stored and computed. One rule for the exporters
(exporters/common/ranks.py) and quantization-aware distillation (compress/qat.py)."""

from __future__ import annotations

import math


def aligned_rank(rank: int, max_rank: int, group_size: int) -> int:
    """`rank` rounded to the nearest multiple of `group_size` (halves up), at least one
    group and at most `max_rank`. A layer kept at its max rank (or whose max rank is below
    one group) stays there: at full rank it is exported dense, whose input width is the
    layer's own."""
    if rank >= max_rank or max_rank <= group_size:
        return max_rank
    rounded = max(group_size, group_size * math.floor(rank / group_size + 0.5))
    return min(rounded, max_rank - max_rank % group_size)
