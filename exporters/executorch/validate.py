"""Run a `.pte` with `executorch.runtime` and compare it with the PyTorch model at the same
ranks: max |Δ| and top-1 agreement on sample inputs, and for decoders greedy generation
of `GENERATION_TOKENS` tokens through the static KV cache inside the program.

Errors are the typed ones of `validate.py` (`OutputMismatchError`, `ShapeError`,
`GenerationMismatchError`), raised only when `strict` (float32 exports); quantized
programs are measured and reported.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from flexrank.compress.select import nested_layers
from flexrank.exporters.common.errors import GenerationMismatchError, OutputNamesError
from flexrank.exporters.common.validate import (
    GENERATION_TOKENS,
    ValidationReport,
    _check_outputs,
    torch_greedy,
)

logger = logging.getLogger(__name__)


@contextmanager
def at_ranks(model, ranks: dict[str, int]):
    """`model` with its nested layers at `ranks`; the previous ranks are restored after."""
    layers = nested_layers(model)
    previous = {name: layer.rank for name, layer in layers.items()}
    for name, rank in ranks.items():
        layers[name].rank = rank
    try:
        yield model
    finally:
        for name, rank in previous.items():
            layers[name].rank = rank


def runtime():
    """`executorch.runtime.Runtime` with ExecuTorch's quantized kernels registered (the
    8da4w programs' `quantized_decomposed::embedding_byte` / `embedding_4bit`, which
    phones' LLM runtimes link; the pip wheel's Python runtime loads them on import), and
    its LLM custom ops (decoders' `llama::update_cache` / `llama::custom_sdpa`, which
    ExecuTorch's LLM runner and its Android/iOS libraries ship)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (the LLM ops)
    import executorch.kernels.quantized  # noqa: F401  (registers the kernels)
    from executorch.runtime import Runtime

    return Runtime.get()


@contextmanager
def native_stderr_at_debug():
    """What native code writes to the process's stderr inside the block (ExecuTorch's
    runtime on its first load: "[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/..."
    on a machine that is not an ARM phone) goes to this module's logger at DEBUG, so the
    default terminal stays clean and -v shows it; when the block raises, the lines are
    logged at ERROR instead (the runtime explains a failed load there, its Python
    exception carries only an error code). Python's own writes are flushed first; where
    stderr cannot be redirected, the block runs as it is."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    sys.stderr.flush()
    try:
        captured = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    except OSError:
        captured = None
    try:
        saved = None if captured is None else os.dup(2)
    except OSError:
        saved = None
    if saved is None:
        if captured is not None:
            captured.close()
        yield
        return
    failed = False
    try:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                logger.log(logging.ERROR if failed else logging.DEBUG, "native: %s", line)
    finally:
        os.close(saved)
        captured.close()


def load_program(path: Path):
    """The program at `path` with its weights file beside it when there is one
    (`program.weights_path`: a tied table's program keeps every constant there)."""
    from flexrank.exporters.executorch.program import weights_path

    data = weights_path(path)
    with native_stderr_at_debug():
        return runtime().load_program(Path(path), data_path=data if data.is_file() else None)


def load_method(path: Path, name: str = "forward"):
    program = load_program(path)
    with native_stderr_at_debug():
        return program.load_method(name)


def constant_methods(path: Path) -> dict:
    """{name: value} of every method other than `forward` (the stored metadata)."""
    program = load_program(path)
    values = {}
    for name in sorted(program.method_names - {"forward"}):
        out = list(program.load_method(name).execute([]))
        values[name] = out[0] if len(out) == 1 else out
    return values


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def pte_greedy(forward, prompt: torch.Tensor, steps: int) -> np.ndarray:
    """Greedy tokens: prefill `prompt` (1, T) at positions 0..T-1, then one token a step."""
    length = prompt.shape[1]
    logits = forward.execute([prompt, torch.arange(length)])[0]
    tokens = []
    for step in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        tokens.append(int(token))
        if step + 1 < steps:
            logits = forward.execute([token, torch.tensor([length + step])])[0]
    return np.array([tokens])


@torch.no_grad()
def validate_decoder_pte(path: Path, model, input_ids: torch.Tensor, tolerance: float,
                         strict: bool, generate: bool) -> ValidationReport:
    """`model`: PyTorch at the exported ranks; every row of `input_ids` (B, T) is prefilled
    at position 0 (the cache is overwritten, later positions are masked)."""
    forward = load_method(path)
    got, expected = [], []
    for row in input_ids:
        ids = row[None]  # (1, T)
        got.append(_numpy(forward.execute([ids, torch.arange(ids.shape[1])])[0]))
        expected.append(_numpy(model(input_ids=ids).logits))
    worst, ref_max, top1 = _check_outputs(["logits"], [np.concatenate(got)],
                                          {"logits": np.concatenate(expected)}, tolerance,
                                          strict)
    match = None
    if generate:
        prompt = input_ids[:1]
        ours = pte_greedy(forward, prompt, GENERATION_TOKENS)
        theirs = torch_greedy(model, prompt, GENERATION_TOKENS)
        match = bool(np.array_equal(ours, theirs))
        if strict and not match:
            raise GenerationMismatchError(f"{path.name}: greedy generation differs from "
                                          f"PyTorch's: {ours.tolist()} vs {theirs.tolist()}")
    return ValidationReport(worst, ref_max, top1, match, ("logits",))


@torch.no_grad()
def validate_module_pte(path: Path, run_torch, inputs: tuple, tolerance: float,
                        strict: bool, names: tuple[str, ...] | None = None) -> ValidationReport:
    """Encoders and generic modules: `inputs` in the program's order; `run_torch(*inputs)`
    returns the PyTorch outputs as a tuple (`names`: theirs, else output_<i>)."""
    got = [_numpy(t) for t in load_method(path).execute(list(inputs))]
    reference = run_torch(*inputs)
    reference = reference if isinstance(reference, (tuple, list)) else (reference,)
    if len(got) != len(reference):
        raise OutputNamesError(f"{path.name} returns {len(got)} outputs, PyTorch {len(reference)}")
    names = list(names or (f"output_{i}" for i in range(len(got))))
    expected = {name: _numpy(t) for name, t in zip(names, reference, strict=True)}
    worst, ref_max, top1 = _check_outputs(names, got, expected, tolerance, strict)
    return ValidationReport(worst, ref_max, top1, None, tuple(names))
