"""Rank heat-map of a nested plan: rows = block, columns = layer type, one panel per budget.

Colour is the kept rank fraction r / min(m, n). matplotlib is imported inside the
functions and only the object-oriented `Figure` API is used (no pyplot, no backend
switch), so importing this module changes nothing.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import numpy as np

from flexrank.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from flexrank.planning.planner import NestedPlan

BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)(?=\.|$)")


def block_and_type(name: str) -> tuple[int | None, str]:
    """`model.layers.3.self_attn.q_proj` -> (3, "q_proj"); no block number -> (None, ...)."""
    match = BLOCK_PATTERN.search(name)
    return (int(match.group(1)) if match else None), name.rsplit(".", 1)[-1]


def rank_grid(plan: NestedPlan) -> tuple[list[str], list[str], np.ndarray]:
    """Row labels (blocks), column labels (types) and (B, rows, cols) kept rank fractions.

    Cells with no layer are NaN. When two layers share a (block, type) cell, the type is
    the full name without its block number instead (e.g. encoder vs decoder layers).
    """
    keys = [block_and_type(name) for name in plan.layer_names]
    if len(set(keys)) < len(keys):
        keys = [(block, BLOCK_PATTERN.sub(".#", name, count=1))
                for (block, _), name in zip(keys, plan.layer_names, strict=True)]
    blocks = sorted({b for b, _ in keys if b is not None})
    has_other = any(b is None for b, _ in keys)
    types = list(dict.fromkeys(t for _, t in keys))
    row_of = {b: i for i, b in enumerate(blocks)} | {None: len(blocks)}
    col_of = {t: j for j, t in enumerate(types)}
    grid = np.full((len(plan.budgets), len(blocks) + has_other, len(types)), np.nan)
    full = np.array([min(s) for s in plan.shapes], dtype=np.float64)
    fractions = np.array(plan.ranks, dtype=np.float64) / full  # (B, L)
    for layer, (block, kind) in enumerate(keys):
        grid[:, row_of[block], col_of[kind]] = fractions[:, layer]
    labels = [str(b) for b in blocks] + (["other"] if has_other else [])
    return labels, types, grid


def heatmap_figure(plan: NestedPlan) -> Figure:
    from matplotlib.figure import Figure

    rows, cols, grid = rank_grid(plan)
    width = 1.5 + len(plan.budgets) * (0.9 + 0.35 * len(cols))
    height = 1.8 + 0.16 * len(rows)
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, len(plan.budgets), squeeze=False)[0]
    for ax, budget, panel in zip(axes, plan.budgets, grid, strict=True):
        image = ax.imshow(panel, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                          interpolation="nearest")
        ax.set_title(f"budget {budget:g}")
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=6)
    axes[0].set_ylabel("block")
    fig.colorbar(image, ax=list(axes), label="kept rank r / min(m, n)")
    return fig


def save_heatmap(plan: NestedPlan, path: str | os.PathLike) -> None:
    """Write the heat-map as a PNG (atomically: never a half file)."""
    with atomic_path(path) as tmp:
        heatmap_figure(plan).savefig(tmp, format="png", dpi=110)
