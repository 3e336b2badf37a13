"""Validate an exported graph against PyTorch (optimum's policy: names and shapes must
match, values within tolerance), and for decoders greedy generation token by token
through the KV cache.

Errors are typed so that callers (and tests) can tell what failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from flexrank.exporters.common.errors import (
    GenerationMismatchError,
    OutputMismatchError,
    OutputNamesError,
    ShapeError,
)
from flexrank.runtime.kv_cache import decoder_feed, onnx_greedy

# |Δ| allowed, relative to max(1, max |reference|): float32 rounding of the gauge-fixed
# factors (cond ≤ MAX_CONDITION) stays well below it.
DEFAULT_TOLERANCE = 1e-3
GENERATION_TOKENS = 20


@dataclass(frozen=True)
class ValidationReport:
    max_abs_diff: float  # over every compared output
    max_abs_reference: float
    top1_agreement: float  # fraction of positions whose argmax (last axis) agrees
    generation_match: bool | None  # decoders: greedy tokens identical (None: not checked)
    outputs: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def comparable(name: str, value: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The parts of a graph output and of PyTorch's that must agree.

    Shapes must match, except along the sequence axis of a KV cache (present.<i>.*,
    (B, heads, T, head_dim)): with a sliding window transformers keeps only the last
    positions (its sliding-window cache layer), while the exported graph returns every
    position and masks the old ones. What the graph promises is the logits and the cache
    positions both keep, so a shorter PyTorch cache is compared with the graph's last ones.

    Raises ShapeError for any other difference.
    """
    cache = name.startswith("present.") and value.ndim == ref.ndim == 4
    if cache and value.shape[:2] == ref.shape[:2] and value.shape[3] == ref.shape[3] \
            and ref.shape[2] < value.shape[2]:
        return value[:, :, value.shape[2] - ref.shape[2]:], ref
    if tuple(value.shape) != tuple(ref.shape):
        raise ShapeError(f"output {name!r} has shape {tuple(value.shape)}, PyTorch gives "
                         f"{tuple(ref.shape)}")
    return value, ref


def _check_outputs(names: list[str], got: list[np.ndarray], expected: dict[str, np.ndarray],
                   tolerance: float, strict_values: bool) -> tuple[float, float, float]:
    if not set(names) <= set(expected):
        raise OutputNamesError(f"graph outputs {sorted(set(names) - set(expected))} are not "
                               f"among PyTorch's outputs {sorted(expected)}")
    worst, reference_max, agreements = 0.0, 0.0, []
    for name, value, ref in zip(names, got, (expected[n] for n in names), strict=True):
        value, ref = comparable(name, value, ref)
        diff = float(np.abs(value.astype(np.float64) - ref).max()) if ref.size else 0.0
        scale = max(1.0, float(np.abs(ref).max()) if ref.size else 0.0)
        if strict_values and diff > tolerance * scale:
            raise OutputMismatchError(f"output {name!r}: max |Δ| {diff:.3g} exceeds "
                                      f"{tolerance:g} × {scale:.3g}")
        worst, reference_max = max(worst, diff), max(reference_max, scale)
        if ref.ndim >= 2 and ref.shape[-1] > 1:
            agreements.append(float((value.argmax(-1) == ref.argmax(-1)).mean()))
    top1 = agreements[0] if agreements else 1.0
    return worst, reference_max, top1


@torch.no_grad()
def torch_greedy(model, prompt: torch.Tensor, steps: int) -> np.ndarray:
    ids = prompt
    for _ in range(steps):
        logits = model(input_ids=ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return _numpy(ids[:, prompt.shape[1]:])


@torch.no_grad()
def validate_decoder(session, model, input_ids: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE,
                     strict_values: bool = True, generate: bool = True,
                     feed_extra: dict | None = None) -> ValidationReport:
    """`model` is the PyTorch model at the same budget; `input_ids` (B, T) a sample."""
    out = model(input_ids=input_ids, use_cache=True)
    expected = {"logits": _numpy(out.logits)}
    cache = out.past_key_values
    for i in range(len(cache.layers) if hasattr(cache, "layers") else len(cache)):
        key, value = (cache.layers[i].keys, cache.layers[i].values) if hasattr(cache, "layers") \
            else cache[i]
        expected[f"present.{i}.key"] = _numpy(key)
        expected[f"present.{i}.value"] = _numpy(value)
    feed = decoder_feed(session, _numpy(input_ids), None, 0)
    feed.update(feed_extra or {})
    names = [o.name for o in session.get_outputs()]
    if sorted(names) != sorted(expected):
        raise OutputNamesError(f"decoder graph outputs {names} differ from the expected "
                               f"{sorted(expected)} (logits and present.<i>.key|value)")
    got = session.run(None, feed)
    worst, ref_max, top1 = _check_outputs(names, got, expected, tolerance, strict_values)
    match = None
    if generate:
        prompt = input_ids[:1]
        ours = onnx_greedy(session, _numpy(prompt), GENERATION_TOKENS, feed_extra)
        theirs = torch_greedy(model, prompt, GENERATION_TOKENS)
        match = bool(np.array_equal(ours, theirs))
        if strict_values and not match:
            raise GenerationMismatchError(f"greedy generation differs from PyTorch's: "
                                          f"{ours.tolist()} vs {theirs.tolist()}")
    return ValidationReport(worst, ref_max, top1, match, tuple(names))


@torch.no_grad()
def validate_named(session, run_torch: Callable[[dict], dict], inputs: dict,
                   tolerance: float = DEFAULT_TOLERANCE, strict_values: bool = True,
                   feed_extra: dict | None = None) -> ValidationReport:
    """Encoders and generic modules: feed `inputs` by graph input name; `run_torch(inputs)`
    returns {output name: tensor} for the graph's output names."""
    wanted = [i.name for i in session.get_inputs()]
    feed = {name: _numpy(inputs[name]) for name in wanted if name in inputs}
    feed.update(feed_extra or {})
    missing = [name for name in wanted if name not in feed]
    if missing:
        raise OutputNamesError(f"graph inputs {missing} have no sample value")
    names = [o.name for o in session.get_outputs()]
    expected = {k: _numpy(v) for k, v in run_torch(inputs).items()}
    worst, ref_max, top1 = _check_outputs(names, session.run(None, feed), expected, tolerance,
                                          strict_values)
    return ValidationReport(worst, ref_max, top1, None, tuple(names))
