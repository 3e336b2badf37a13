"""Quality figures: perplexity on text (sliding window), KL to the teacher and top-1
agreement with it; per budget for an elastic model; cosine similarity for encoders.

Perplexity follows the usual strided evaluation: windows of `seq_len` tokens advance by
`stride`; each window scores only the tokens no earlier window scored, with the rest as
context, so every token of the text is predicted exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flexrank.compress.calibration import as_batch
from flexrank.compress.models import check_positions, check_vocabulary


class EvaluationError(ValueError):
    """Input that cannot be evaluated (empty or too-short text, wrong model kind)."""


@dataclass(frozen=True)
class Window:
    input_ids: torch.Tensor  # (T,)
    score_from: int  # positions >= score_from are predicted (targets start at 1)


def windows(ids: torch.Tensor, seq_len: int, stride: int) -> Iterator[Window]:
    """Strided windows over a 1-D token tensor; every token after the first is scored once
    (a window always starts at least one token before the first token it scores)."""
    if stride < 1 or stride > seq_len:
        raise EvaluationError(f"stride {stride} must be in [1, seq_len={seq_len}]")
    scored_until = 1  # token 0 has no context and is never predicted
    start = 0
    while scored_until < len(ids):
        end = min(start + seq_len, len(ids))
        yield Window(ids[start:end], scored_until - start)
        scored_until = end
        if end == len(ids):
            break
        start = min(start + stride, scored_until - 1)  # keep ≥ 1 token of context


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    if not text or not text.strip():
        raise EvaluationError("the evaluation text is empty")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"],
                       dtype=torch.long)  # one long sequence, cut into windows: no warning
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise EvaluationError(f"the evaluation text has {len(ids)} token(s); at least 2 are "
                              "needed to score one prediction")
    return ids


def _check_windows(model: nn.Module, ids: torch.Tensor, seq_len: int) -> None:
    """Refuse windows longer than the positions `model` was trained for (PositionLimitError);
    a text shorter than `seq_len` makes one window of its own length."""
    length = min(seq_len, len(ids))
    check_positions(model, length, f"evaluation windows of {length} tokens",
                    "pass a seq_len (--seq-len) no larger than that")
    check_vocabulary(model, ids, "the evaluation text's tokens")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids[None], attention_mask=torch.ones_like(ids[None]))
    logits = getattr(out, "logits", None)
    if logits is None:
        raise EvaluationError(f"{type(model).__name__} returns no logits: perplexity needs a "
                              "language model (use cosine_similarity for encoders)")
    return logits[0].float()  # (T, V)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 256,
               stride: int | None = None) -> float:
    """exp(mean negative log-likelihood) of every token of `ids` after the first.
    Raises PositionLimitError when a window would exceed the model's positions."""
    _check_windows(model, ids, seq_len)
    nll, count = 0.0, 0
    for window in windows(ids, seq_len, stride or seq_len):
        logits = _logits(model, window.input_ids)
        targets = window.input_ids[1:]
        losses = F.cross_entropy(logits[:-1], targets, reduction="none")
        scored = losses[window.score_from - 1:]
        nll += float(scored.sum())
        count += scored.numel()
    return math.exp(nll / count)


@torch.no_grad()
def teacher_agreement(model: nn.Module, teacher: nn.Module, ids: torch.Tensor,
                      seq_len: int = 256, stride: int | None = None) -> dict[str, float]:
    """Mean KL(teacher ‖ model) per token and top-1 agreement with the teacher.
    Raises PositionLimitError when a window would exceed either model's positions."""
    _check_windows(model, ids, seq_len)
    _check_windows(teacher, ids, seq_len)
    kl, agree, count = 0.0, 0, 0
    for window in windows(ids, seq_len, stride or seq_len):
        student = F.log_softmax(_logits(model, window.input_ids), -1)
        reference = F.log_softmax(_logits(teacher, window.input_ids), -1)
        keep = slice(window.score_from - 1, len(window.input_ids) - 1)
        s, t = student[keep], reference[keep]
        kl += float(F.kl_div(s, t, log_target=True, reduction="sum"))
        agree += int((s.argmax(-1) == t.argmax(-1)).sum())
        count += s.shape[0]
    return {"kl": kl / count, "top1": agree / count}


def evaluate_elastic(elastic, teacher: nn.Module | None, ids: torch.Tensor,
                     budgets: Sequence[float] | None = None, seq_len: int = 256,
                     stride: int | None = None) -> dict[float, dict[str, float]]:
    """{β: {ppl, kl, top1}} for every budget of an ElasticModel (kl/top1 need the teacher)."""
    results = {}
    for beta in budgets or elastic.budgets:
        elastic.set_budget(beta)
        row = {"ppl": perplexity(elastic.model, ids, seq_len, stride)}
        if teacher is not None:
            row.update(teacher_agreement(elastic.model, teacher, ids, seq_len, stride))
        results[beta] = row
    return results


@torch.no_grad()
def cosine_similarity(model: nn.Module, reference: nn.Module, batches: Sequence[dict],
                      ) -> float:
    """Mean cosine similarity of the encoders' token embeddings (last hidden state), over
    batches as `flexrank.compress.calibration.as_batch` takes them (dicts with input_ids,
    or bare (B, T) id tensors)."""
    total, count = 0.0, 0
    for batch in batches:
        batch = as_batch(batch, model)
        a = model(**batch).last_hidden_state
        b = reference(**batch).last_hidden_state
        sims = F.cosine_similarity(a.float(), b.float(), dim=-1)  # (B, T)
        mask = batch.get("attention_mask")
        if mask is not None:
            sims = sims[mask.bool()]
        total += float(sims.sum())
        count += sims.numel()
    return total / count


def evaluate_models(models: dict[float, nn.Module], teacher: nn.Module | None,
                    ids: torch.Tensor, seq_len: int = 256, stride: int | None = None,
                    ) -> dict[float, dict[str, float]]:
    """{β: {ppl[, kl, top1]}} for ready-made per-budget models (e.g. bundle_decoders)."""
    results = {}
    for beta, model in sorted(models.items()):
        row = {"ppl": perplexity(model, ids, seq_len, stride)}
        if teacher is not None:
            row.update(teacher_agreement(model, teacher, ids, seq_len, stride))
        results[beta] = row
    return results
