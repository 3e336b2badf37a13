"""Held-out quality per budget and precision, measured once and stored with the elastic
checkpoint (`flexrank-quality.json`), for `--budget auto` (`flexrank.device.decide`).

For each β and each precision a runtime ships (fp32; onnxruntime's dynamic int8 and 4-bit
MatMulNBits; ExecuTorch's 8da4w) the model is evaluated in PyTorch computing as its
quantized export does:

- int4 and 8da4w: `flexrank.compress.qat.fake_quantized` (bit-exact MatMulNBits RTN
  weights with int8 activation blocks, the tied table in 4-bit blocks; torchao's 8da4w
  fake quantizers), ranks rounded to the block as the exporters round them
  (`EXPORT_DEFAULTS`);
- int8: `quantize_dynamic(per_channel=True, QInt8)` as exporters/onnx/convert.py calls it:
  each exported MatMul weight symmetric int8 per output channel (scale = max|w| / 127,
  onnxruntime's symmetric range [−127, 127]), activations uint8 asymmetric with one scale
  per tensor (DynamicQuantizeLinear; here one tensor = one evaluation batch, as in
  prefill); the tied lm_head stays float, as the exporter leaves it. Factorised layers
  ship plain (Vᵣᵀ then Uᵣ) or dense, never gauge-fixed (`qat.deployed_form`).

Figures per (β, precision), by the objective of the model's kind (`objectives.resolve` on
the original's output; `objective` in each row):

- token_kl (causal LMs): perplexity of the held-out sequences and the mean per-token
  KL(original ‖ candidate) in nats, with top-1 agreement (Hinton et al. 2015 for the KL
  form; perplexity = exp(mean next-token NLL));
- feature (encoders without a head): "cosine", the mean over inputs of the cosine of the
  candidate's mean-pooled last hidden state (over real tokens; sentence-transformers'
  sentence embedding) to the original's, and "loss", the feature objective
  (`objectives.feature_loss`, σ per batch), averaged over inputs;
- class_kl (classifiers): "top1", the share of inputs whose top class is the original's,
  and "kl", KL(original ‖ candidate) of the class distributions, nats per input.

The feature and class figures need the original model (they are distances to it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flexrank.compress.calibration import as_batch, model_batches, takes_token_ids, to_batches
from flexrank.compress.config import Objective
from flexrank.compress.layers import NestedLinear
from flexrank.compress.objectives import class_kl, feature_terms, output_tensor
from flexrank.io import write_json_atomic

logger = logging.getLogger(__name__)

QUALITY_FILE = "flexrank-quality.json"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "int8", "int4", "8da4w")
# What flexrank-export ships by default, as the fake quantizers take it: int4 blocks of 32
# with the tied embedding/lm_head table in 4-bit blocks (OnnxExportConfig's defaults);
# 8da4w groups of 32 (exporters/executorch). Stored with the figures.
EXPORT_DEFAULTS = {"int4": {"block_size": 32, "embedding_bits": 4},
                   "8da4w": {"block_size": 32}}


# ---- int8 as onnxruntime's dynamic quantization stores and computes it --------------------


def fake_quantize_int8_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """W (out, in) -> its per-output-channel symmetric int8 value (onnxruntime QInt8
    per_channel: scale = max|w| / 127 per row, q = clamp(round(w / scale), −127, 127); the
    scales read back from quantize_dynamic's graph, tests/test_quality.py)."""
    absmax = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)  # (out, 1)
    scale = absmax / 127.0
    return torch.clamp(torch.round(weight / scale), -127, 127) * scale


def fake_quantize_uint8_tensor(x: torch.Tensor) -> torch.Tensor:
    """DynamicQuantizeLinear: one asymmetric uint8 scale for the whole tensor, the range
    widened to hold 0 (onnxruntime operator docs)."""
    lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = ((hi - lo) / 255.0).clamp_min(1e-12)
    zero = torch.clamp(torch.round(-lo / scale), 0, 255)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def _int8_linear(x, weight, bias=None):
    return F.linear(fake_quantize_uint8_tensor(x), fake_quantize_int8_per_channel(weight), bias)


def _int8_nested(layer: NestedLinear, x: torch.Tensor) -> torch.Tensor:
    from flexrank.compress.qat import deployed_form

    r = layer.rank
    U, V = layer.U[:, :r], layer.V[:, :r]  # (m, r), (n, r)
    if deployed_form(layer.out_features, layer.in_features, r) == "dense":
        return _int8_linear(x, U @ V.T, layer.bias)
    return _int8_linear(_int8_linear(x, V.T), U, layer.bias)


@contextlib.contextmanager
def fake_int8(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every NestedLinear and every Linear not tied to an embedding
    computes as onnxruntime's dynamic int8 export of it."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    changed = []
    for module in model.modules():
        if isinstance(module, NestedLinear):
            module.forward = partial(_int8_nested, module)
        elif type(module) is nn.Linear and id(module.weight) not in tied:
            module.forward = partial(lambda m, x: _int8_linear(x, m.weight, m.bias), module)
        else:
            continue
        changed.append(module)
    try:
        yield model
    finally:
        for module in changed:
            module.__dict__.pop("forward", None)


def export_spec(precision: str):
    """The 4-bit `QuantSpec` of `precision` as exported by default, remembering the
    quantized value of each whole parameter (the tied embedding/lm_head table, the same
    at every budget: torchao quantizes SmolLM2's 49152 x 576 table in ~14 s) while the
    spec lives; factor slices and products are quantized on every call."""
    from flexrank.compress.qat import QuantSpec

    memo: dict[tuple[int, int, int], torch.Tensor] = {}

    class RememberingSpec(QuantSpec):
        def weight(self, w: torch.Tensor, bits: int = 4) -> torch.Tensor:
            if not isinstance(w, nn.Parameter) or torch.is_grad_enabled():
                return super().weight(w, bits)
            key = (id(w), bits, w._version)
            if key not in memo:
                memo[key] = super().weight(w, bits)
            return memo[key]

    return RememberingSpec(precision, **EXPORT_DEFAULTS[precision])


def as_exported(model: nn.Module, precision: str, spec=None):
    """A context in which `model` computes as its `precision` export (`spec`: a 4-bit
    precision's `export_spec`, made here when not given)."""
    if precision == "fp32":
        return contextlib.nullcontext(model)
    if precision == "int8":
        return fake_int8(model)
    if precision in ("int4", "8da4w"):
        from flexrank.compress.qat import fake_quantized

        return fake_quantized(model, spec or export_spec(precision))
    raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


# ---- measuring ---------------------------------------------------------------------------


@torch.no_grad()
def _figures(model: nn.Module, batches: Sequence[dict], teacher_logp: list | None) -> dict:
    nll = kl = 0.0
    agree = predicted = 0
    for i, batch in enumerate(batches):
        logits = model(**batch).logits.float()  # (B, T, V)
        logp = F.log_softmax(logits[:, :-1], -1)
        mask = batch["attention_mask"][:, 1:].bool()  # positions that predict a real token
        targets = batch["input_ids"][:, 1:]
        nll -= float(logp.gather(-1, targets[..., None])[..., 0][mask].sum())
        predicted += int(mask.sum())
        if teacher_logp is not None:
            t = teacher_logp[i]
            kl += float((t.exp() * (t - logp)).sum(-1)[mask].sum())
            agree += int((logp.argmax(-1) == t.argmax(-1))[mask].sum())
    out = {"ppl": math.exp(nll / predicted)}
    if teacher_logp is not None:
        out.update(kl=kl / predicted, top1=agree / predicted)
    return out


def model_objective(model: nn.Module, samples: torch.Tensor) -> Objective:
    """The objective of `model`'s kind, from its output on the first held-out sample
    (`objectives.resolve`): token_kl, class_kl or feature."""
    from flexrank.compress.distill import resolve_objective, stack_batches

    data, positional = stack_batches(model_batches(samples[:1], 1, model), model)
    return resolve_objective(Objective.AUTO, model, data, positional)


@torch.no_grad()
def _output_figures(model: nn.Module, tables: list[dict], positional: bool,
                    objective: Objective, reference: list[torch.Tensor]) -> dict:
    """feature: {cosine, loss}; class_kl: {top1, kl}; per batch, weighted by its inputs."""
    from flexrank.compress.distill import call

    sums: dict[str, float] = {}
    count = 0
    for table, t_out in zip(tables, reference, strict=True):
        s_out = output_tensor(call(model, table, positional), objective).float()
        if objective == Objective.CLASS_KL:
            figures = {"top1": float((s_out.argmax(-1) == t_out.argmax(-1)).float().mean()),
                       "kl": float(class_kl(s_out, t_out))}
        else:
            terms = feature_terms(s_out, t_out, table.get("attention_mask"))
            figures = {"cosine": 1 - float(terms["pooled_cos"]),
                       "loss": float(sum(terms.values()))}
        for key, value in figures.items():
            sums[key] = sums.get(key, 0.0) + value * len(t_out)
        count += len(t_out)
    return {key: value / count for key, value in sums.items()}


def measure_quality(elastic, ids: torch.Tensor, teacher: nn.Module | None = None,
                    precisions: Sequence[str] = PRECISIONS, budgets=None,
                    batch_size: int = 4) -> list[dict]:
    """[{beta, precision, objective, figures...}] for every budget × precision on held-out
    samples `ids`: token ids (N, T) for a model that reads text, else its inputs (N, ...)
    (images). Figures by objective (module docstring): token_kl {ppl[, kl, top1]}, each
    sequence scored from its second token; feature {cosine, loss}; class_kl {top1, kl}.
    KL and top-1, and every feature and class figure, need `teacher`, the original model
    (ValueError without it for an encoder or a classifier). The model's budget is left at
    the largest."""
    model = elastic.model
    if takes_token_ids(model) and (ids.ndim != 2 or ids.shape[1] < 2):
        raise ValueError(f"held-out ids must be (sequences, tokens >= 2), got {tuple(ids.shape)}")
    was_training = model.training
    model.eval()
    budgets = list(budgets or elastic.budgets)
    pairs = [(p, b) for p in precisions for b in budgets]
    specs = {p: export_spec(p) for p in precisions if p in ("int4", "8da4w")}
    try:
        objective = model_objective(teacher if teacher is not None else model, ids)
        if objective == Objective.TOKEN_KL:
            batches = [as_batch(b, model) for b in to_batches(ids, batch_size)]
            reference = None
            if teacher is not None:
                with torch.no_grad():
                    reference = [F.log_softmax(teacher(**b).logits.float()[:, :-1], -1)
                                 for b in batches]

            def figures():
                return _figures(model, batches, reference)
        else:
            if teacher is None:
                raise ValueError(f"the quality of a model measured by {objective.value} "
                                 "(an encoder or a classifier) is its distance to the "
                                 "original model: pass teacher=")
            from flexrank.compress.distill import call, stack_batches

            tables, positional = [], False
            for b in model_batches(ids, batch_size, model):
                table, positional = stack_batches([b], model)
                tables.append(table)
            with torch.no_grad():
                reference = [output_tensor(call(teacher, t, positional), objective).float()
                             for t in tables]

            def figures():
                return _output_figures(model, tables, positional, objective, reference)
        rows = []
        for precision, beta in tqdm(pairs, desc="quality per budget and precision",
                                    leave=False):
            elastic.set_budget(beta)
            with as_exported(model, precision, specs.get(precision)):
                rows.append({"beta": float(beta), "precision": precision,
                             "objective": objective.value, **figures()})
    finally:
        elastic.set_budget(max(elastic.budgets))
        model.train(was_training)
    return rows


def ids_digest(ids: torch.Tensor) -> str:
    """sha256 of the held-out samples: token ids as int64, other inputs (images) as their
    own dtype and bytes."""
    data = ids.to(torch.int64) if not ids.is_floating_point() else ids.contiguous()
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


# What each objective's figures are, stored with them.
FIGURES = {"token_kl": "ppl: perplexity of the held-out text; kl: KL(original || candidate), "
                       "nats per token; top1: share of tokens whose top prediction is the "
                       "original's",
           "feature": "cosine: mean over inputs of the cosine of the mean-pooled last "
                      "hidden state to the original's; loss: the feature objective "
                      "(objectives.feature_loss), mean over inputs",
           "class_kl": "top1: share of inputs whose top class is the original's; kl: "
                       "KL(original || candidate) of the class distributions, nats per input"}


def save_quality(directory: str | Path, rows: list[dict], ids: torch.Tensor, text_source: str,
                 original: str | None) -> Path:
    """Write `flexrank-quality.json` into an elastic checkpoint folder (atomically)."""
    path = Path(directory) / QUALITY_FILE
    objectives = sorted({r.get("objective", "token_kl") for r in rows})
    write_json_atomic(path, {
        "format": "flexrank-quality", "format_version": FORMAT_VERSION,
        "text": {"source": text_source, "sequences": int(ids.shape[0]),
                 "tokens_per_sequence": int(ids.shape[1]) if ids.ndim == 2 else None,
                 "shape": list(ids.shape),
                 "sha256": ids_digest(ids)},
        "original": original, "kl": "KL(original || candidate), nats per token",
        "figures": {o: FIGURES[o] for o in objectives if o in FIGURES},
        "settings": EXPORT_DEFAULTS,
        "rows": rows})
    return path


def load_quality(directory: str | Path) -> dict | None:
    """The stored quality of an elastic checkpoint folder, or None when absent/unreadable."""
    path = Path(directory) / QUALITY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable %s (%s); quality will be measured again", path, err)
        return None
    if data.get("format") != "flexrank-quality" or data.get("format_version") != FORMAT_VERSION:
        logger.warning("ignoring %s: not flexrank-quality v%d", path, FORMAT_VERSION)
        return None
    return data


def held_out_ids(checkpoint_dir: str | Path) -> tuple[torch.Tensor, str] | None:
    """The held-out sequences a `flexrank compress` run kept beside its checkpoint
    (stages/calibration.safetensors "eval"), and where they came from; None if absent."""
    from safetensors.torch import load_file

    folder = Path(checkpoint_dir)
    for stages in (folder / "stages", folder.parent / "stages"):
        path = stages / "calibration.safetensors"
        if path.is_file():
            held = load_file(str(path)).get("eval")  # token ids (N, T) or inputs (N, ...)
            if held is not None and held.ndim >= 2 and held.shape[0] > 0:
                return held, f"held-out calibration sequences of {path}"
    return None


def quality_rows(elastic, folder: str | Path | None, precisions: Sequence[str],
                 teacher_loader=None) -> tuple[list[dict], str]:
    """The stored quality rows of the checkpoint in `folder` for every budget × `precisions`,
    measuring (and storing) the missing ones once when the held-out text that `compress`
    kept beside it exists. Returns (rows, a note on where they come from). The original
    model for KL is `teacher_loader()` (None, or a loader that fails: perplexity only for
    an LM, nothing measured for an encoder or a classifier)."""
    folder = None if folder is None else Path(folder)
    stored = load_quality(folder) if folder is not None else None
    if stored and stored.get("settings") != json.loads(json.dumps(EXPORT_DEFAULTS)):
        stored = None  # measured under other export settings: measure again
    rows = list(stored["rows"]) if stored else []
    have = {(float(r["beta"]), r["precision"]) for r in rows}
    missing = [p for p in precisions
               if any((float(b), p) not in have for b in elastic.budgets)]
    if not missing:
        return rows, f"stored in {folder / QUALITY_FILE}"
    held = held_out_ids(folder) if folder is not None else None
    if held is None:
        return rows, ("not measured for " + ", ".join(missing) + ": no held-out text beside "
                      "the checkpoint (a `flexrank compress` folder keeps it in stages/)")
    ids, source = held
    if stored and stored.get("text", {}).get("sha256") != ids_digest(ids):
        rows, have = [], set()  # measured on other text: measure everything again
        missing = list(precisions)
    teacher = None
    if teacher_loader is not None:
        try:
            teacher = teacher_loader()
        except (OSError, ValueError) as err:
            logger.warning("original model not loadable (%s): quality without KL", err)
    if teacher is None and model_objective(elastic.model, ids) != Objective.TOKEN_KL:
        return rows, ("not measured for " + ", ".join(missing) + ": an encoder's or a "
                      "classifier's quality is its distance to the original model, which "
                      "could not be loaded")
    budgets = [b for b in elastic.budgets]
    for precision in missing:
        todo = [b for b in budgets if (float(b), precision) not in have]
        rows += measure_quality(elastic, ids, teacher, [precision], todo)
    original = getattr(elastic, "model_id", None) if teacher is not None else None
    try:
        save_quality(folder, rows, ids, source, original)
        note = f"measured now on {source}; stored in {folder / QUALITY_FILE}"
    except OSError as err:  # a read-only checkpoint: use them, measure again next time
        note = f"measured now on {source}; not stored ({err})"
    return rows, note
