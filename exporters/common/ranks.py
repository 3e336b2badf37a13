"""Ranks rounded to a quantizer's group (ExecuTorch 8da4w) or block (onnxruntime int4):
a low-rank layer's second MatMul has the rank as its inner width, and a width that is not
a multiple of the group is padded, stored and computed. One rule for both formats."""

from __future__ import annotations

import logging

from flexrank.compress.select import nested_layers
from flexrank.planning.alignment import aligned_rank

logger = logging.getLogger(__name__)


def aligned_ranks(ranks: dict[str, int], max_ranks: dict[str, int],
                  group_size: int) -> dict[str, int]:
    return {name: aligned_rank(rank, max_ranks[name], group_size) for name, rank in ranks.items()}


def block_aligned_ranks(elastic, beta: float, block: int, what: str) -> dict[str, int]:
    """{layer: rank} of `elastic` at `beta`, each rounded by `aligned_rank` to a multiple
    of `block` (monotone in the rank, so nested plans stay nested); `what` names the
    quantization in the log line that reports the rounded layers."""
    ranks = elastic.layer_ranks(beta)
    max_ranks = {name: layer.max_rank for name, layer in nested_layers(elastic.model).items()}
    aligned = aligned_ranks(ranks, max_ranks, block)
    moved = {n: (ranks[n], aligned[n]) for n in ranks if ranks[n] != aligned[n]}
    if moved:
        logger.info("β=%g: %d ranks rounded to multiples of %d for %s (e.g. %s)", beta,
                    len(moved), block, what, dict(list(moved.items())[:3]))
    return aligned
