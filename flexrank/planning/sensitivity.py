"""The sensitivity matrix: the contract between probing and planning.

`Sensitivity` holds, for every factorised layer l and candidate rank level k, the rank
`ranks[l, k]` and the measured damage `errors[l, k]` (KL(teacher || model) when only layer
l is cut to that rank). Levels are ascending in rank; the last level of every layer is its
full rank (error 0 by definition: the layer is the original one).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flexrank.io import write_json_atomic

FORMAT_VERSION = 1


@dataclass
class Sensitivity:
    layer_names: list[str]
    shapes: list[tuple[int, int]]  # (out_features m, in_features n) per layer
    ranks: np.ndarray  # (L, K) int64, ascending along K, last = min(m, n)
    errors: np.ndarray  # (L, K) float64, >= 0
    meta: dict = field(default_factory=dict)  # how it was measured (mode, tokens, ...)

    def __post_init__(self):
        self.ranks = np.asarray(self.ranks, dtype=np.int64)
        self.errors = np.asarray(self.errors, dtype=np.float64)
        self.shapes = [tuple(int(v) for v in s) for s in self.shapes]
        L = len(self.layer_names)
        if L == 0:
            raise ValueError("sensitivity matrix is empty: no factorised layers were probed")
        if self.ranks.ndim != 2 or self.ranks.shape != self.errors.shape:
            raise ValueError(
                f"ranks {self.ranks.shape} and errors {self.errors.shape} must be equal 2-D shapes"
            )
        if self.ranks.shape[0] != L or len(self.shapes) != L:
            raise ValueError(
                f"{L} layer names but ranks has {self.ranks.shape[0]} rows and "
                f"{len(self.shapes)} shapes: the matrix does not match the layers"
            )
        if np.any(np.diff(self.ranks, axis=1) <= 0):
            raise ValueError("candidate ranks must be strictly increasing along each row")
        if not np.all(np.isfinite(self.errors)):
            bad = [self.layer_names[i] for i in np.where(~np.isfinite(self.errors).all(1))[0]]
            raise ValueError(f"non-finite sensitivity values for layers {bad[:5]}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def num_levels(self) -> int:
        return int(self.ranks.shape[1])

    def monotone(self) -> Sensitivity:
        """Copy with each layer's error curve forced non-increasing in rank.

        Calibration noise can make a smaller rank look better than a larger one; the
        planner assumes more rank never hurts, so each error becomes the largest error at
        any rank at or above it (running maximum from the right: conservative).
        """
        errors = np.maximum.accumulate(self.errors[:, ::-1], axis=1)[:, ::-1].copy()
        errors = np.maximum(errors, 0.0)
        return Sensitivity(list(self.layer_names), list(self.shapes), self.ranks.copy(),
                           errors, dict(self.meta))

    def to_dict(self) -> dict:
        return {
            "format": "flexrank-sensitivity",
            "format_version": FORMAT_VERSION,
            "layer_names": list(self.layer_names),
            "shapes": [list(s) for s in self.shapes],
            "ranks": self.ranks.tolist(),
            "errors": self.errors.tolist(),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Sensitivity:
        if data.get("format") != "flexrank-sensitivity":
            raise ValueError("not a FlexRank sensitivity file (missing 'format' tag)")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"sensitivity format version {data.get('format_version')} is not supported "
                f"(this FlexRank reads version {FORMAT_VERSION}); re-run the probe"
            )
        return cls(data["layer_names"], [tuple(s) for s in data["shapes"]],
                   np.array(data["ranks"]), np.array(data["errors"]), data.get("meta", {}))

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Sensitivity:
        return cls.from_dict(json.loads(Path(path).read_text()))

