"""Output-matching objectives: how far a student's output is from its teacher's, by model
kind (DistillConfig.objective; "auto" picks from the teacher's output).

- token_kl: causal LMs (and any per-token head, (B, T, V) logits): the mean over real
  tokens of T² · KL(softmax(t/T) ‖ softmax(s/T)) (Hinton et al. 2015, "Distilling the
  Knowledge in a Neural Network": the T² keeps gradients comparable across T).
- class_kl: classifiers (ViT, CNN, BERT with a sequence head): the same KL on class
  logits (B, C), averaged over inputs (one distribution per input, so no token mask).
- feature: encoders without a head (a sentence encoder, ViTModel): on the last hidden
  state (B, T, D), per token and mean-pooled over real tokens (the sentence embedding of
  sentence-transformers), each term (1 − cosine) + MSE of features normalised per feature.
  Cosine on hidden states is DistilBERT's (Sanh et al. 2019); the MSE divides each feature
  by the teacher's standard deviation of it over the batch's real tokens, as batch-
  normalised feature distillation does (Miles & Mikolajczyk 2024, "Understanding the Role
  of the Projector in Knowledge Distillation"), so the few huge-magnitude dimensions of
  BERT-style hidden states do not drown the others.

Intermediate blocks (DistillConfig.intermediate_weight, any objective): `layer_loss`
matches each block's output hidden state, token by token, with the feature objective's
per-token terms (1 − cosine + per-feature-normalised MSE), averaged over blocks: the
layer-to-layer hidden-state transfer of TinyBERT (Jiao et al. 2020, §3.1, "hidden-states-
based distillation", an MSE per layer) and Patient KD (Sun et al. 2019, every layer's
output, normalised), which give the early blocks a direct signal; student and teacher have
the same blocks here (the student is the teacher factorised), so no layer mapping or
projection is needed.

Pure tensor functions; `flexrank.compress.distill` and `flexrank.compress.probe` use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexrank.compress.config import Objective

# A feature whose teacher standard deviation is below this (a constant dimension) is
# divided by this instead: its error then counts in the units of the hidden state.
MIN_FEATURE_STD = 1e-6


def token_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
             temperature: float = 1.0) -> torch.Tensor:
    """Mean over real tokens of T² · KL(softmax(teacher/T) ‖ softmax(student/T)).

    student, teacher: logits (B, T, V), any float dtype (computed in float32); mask: (B, T)
    of 1 for real tokens, 0 for padding (None: every token). Returns a 0-d float32 tensor
    (nats); 0 when the logits are equal."""
    per_token = _kl_rows(student, teacher, temperature)  # (B, T)
    if mask is None:
        return per_token.mean() * temperature**2
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1) * temperature**2


def class_kl(student: torch.Tensor, teacher: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """Mean over inputs of T² · KL(softmax(teacher/T) ‖ softmax(student/T)).

    student, teacher: class logits (B, C). Returns a 0-d float32 tensor (nats)."""
    if student.dim() != 2:
        raise ValueError(f"class_kl takes class logits of shape (batch, classes); got "
                         f"{tuple(student.shape)} (per-token logits: use token_kl)")
    return _kl_rows(student, teacher, temperature).mean() * temperature**2


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) per row of the last axis: (...)."""
    t = F.log_softmax(teacher.float() / temperature, -1)
    s = F.log_softmax(student.float() / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1)


def as_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """Features as (B, T, D): (B, T, D) unchanged; (B, D) as one token; (B, C, *spatial)
    (a CNN's feature map) as (B, H·W…, C), channels as features."""
    if hidden.dim() == 3:
        return hidden
    if hidden.dim() == 2:
        return hidden[:, None]
    if hidden.dim() > 3:
        return hidden.flatten(2).transpose(1, 2)  # (B, C, L) -> (B, L, C)
    raise ValueError(f"features of shape {tuple(hidden.shape)}: expected (batch, ...) with "
                     "at least 2 axes")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens: (B, T, D), mask (B, T) -> (B, D). Sentence-transformers'
    mean pooling (all-MiniLM-L6-v2's sentence embedding before normalisation)."""
    if mask is None:
        return hidden.mean(1)
    weights = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


def feature_terms(student: torch.Tensor, teacher: torch.Tensor,
                  mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The four terms of the feature objective, each a 0-d float32 tensor:

    - token_cos: mean over real tokens of 1 − cos(s_t, t_t);
    - pooled_cos: mean over inputs of 1 − cos(pool(s), pool(t)), pool = `mean_pool`;
    - token_mse: mean over real tokens and features d of ((s_td − t_td) / σ_d)²;
    - pooled_mse: mean over inputs and d of ((pool(s)_d − pool(t)_d) / σ_d)²;

    σ_d: the teacher's standard deviation of feature d over the real tokens of the batch
    (population, detached), at least MIN_FEATURE_STD. Centring both by the teacher's mean
    would cancel in the difference, so only the scale is applied.

    student, teacher: (B, T, D) hidden states (or a shape `as_tokens` takes); mask (B, T)
    of 1 for real tokens (None: every token). Raises ValueError on a shape mismatch."""
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features "
                         f"{tuple(teacher.shape)} differ in shape")
    s, t = as_tokens(student.float()), as_tokens(teacher.float())
    if mask is not None and mask.shape != s.shape[:2]:
        mask = None  # a token mask for another layout (e.g. a CNN): every position counts
    real = torch.ones(s.shape[:2], dtype=torch.float32, device=s.device) if mask is None \
        else mask.to(torch.float32)
    count = real.sum().clamp_min(1)
    with torch.no_grad():
        mean = (t * real[..., None]).sum((0, 1)) / count  # (D,)
        var = ((t - mean).square() * real[..., None]).sum((0, 1)) / count
        std = var.sqrt().clamp_min(MIN_FEATURE_STD)  # (D,)
    token_cos = ((1 - F.cosine_similarity(s, t, dim=-1)) * real).sum() / count
    token_mse = (((s - t) / std).square().mean(-1) * real).sum() / count
    ps, pt = mean_pool(s, real), mean_pool(t, real)  # (B, D)
    pooled_cos = (1 - F.cosine_similarity(ps, pt, dim=-1)).mean()
    pooled_mse = ((ps - pt) / std).square().mean()
    return {"token_cos": token_cos, "pooled_cos": pooled_cos, "token_mse": token_mse,
            "pooled_mse": pooled_mse}


def feature_loss(student: torch.Tensor, teacher: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """The feature objective: the sum of `feature_terms` (0 when the features are equal)."""
    return sum(feature_terms(student, teacher, mask).values())


def block_states(output) -> tuple[torch.Tensor, ...]:
    """The output hidden states of every block but the last, (B, T, D) each, from a model's
    raw output under `output_hidden_states=True` (Hugging Face's `hidden_states`: the
    embeddings, then each block's output; the last block's is what the output objective
    already compares, after any final norm). Raises ValueError when the output has none."""
    states = getattr(output, "hidden_states", None)
    if not isinstance(states, (tuple, list)) or len(states) < 2:
        raise ValueError(f"intermediate matching needs the blocks' hidden states, but the "
                         f"model's {type(output).__name__} output has none (a Hugging Face "
                         "model called with output_hidden_states=True returns them); set "
                         "DistillConfig.intermediate_weight=0 for this model")
    return tuple(states[1:-1])


def layer_loss(student_states, teacher_states, mask: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Mean over blocks of token_cos + token_mse (`feature_terms`) between each block's
    student and teacher hidden states: sequences of (B, T, D) tensors, the same number
    and shapes; mask (B, T) of 1 for real tokens. A 0-d float32 tensor, 0 when they are
    equal (and for no blocks). Raises ValueError when the block counts differ (a student
    with blocks removed: match by layer mapping, not supported)."""
    if len(student_states) != len(teacher_states):
        raise ValueError(f"the student has {len(student_states)} intermediate blocks and the "
                         f"teacher {len(teacher_states)}: intermediate matching needs the "
                         "same depth; set DistillConfig.intermediate_weight=0")
    if not student_states:
        return torch.zeros((), dtype=torch.float32)
    total = 0
    for s, t in zip(student_states, teacher_states, strict=True):
        terms = feature_terms(s, t, mask)
        total = total + terms["token_cos"] + terms["token_mse"]
    return total / len(student_states)


# ---- choosing and applying an objective ------------------------------------------------


def resolve(objective: Objective | str, teacher_output) -> Objective:
    """The objective to use: `objective` itself unless it is "auto"; then from what the
    teacher returns (`teacher_output`, its raw forward output):

    - `.logits` of 3 or more axes (B, T, V): token_kl (causal LM, masked LM, token heads);
    - `.logits` of 2 axes (B, C), or a bare (B, C) tensor: class_kl (classifiers, CNNs);
    - otherwise (`.last_hidden_state`, a tensor of other rank): feature.

    A plain module returning a (B, D) embedding is taken for a classifier: pass
    DistillConfig(objective="feature") for it."""
    objective = Objective(objective)
    if objective != Objective.AUTO:
        return objective
    logits = getattr(teacher_output, "logits", None)
    if torch.is_tensor(logits):
        return Objective.TOKEN_KL if logits.dim() >= 3 else Objective.CLASS_KL
    if torch.is_tensor(teacher_output) and teacher_output.dim() == 2:
        return Objective.CLASS_KL
    return Objective.FEATURE


def output_tensor(output, objective: Objective) -> torch.Tensor:
    """The tensor `objective` compares, from a model's raw forward output: logits for the
    KL objectives, the last hidden state (or the bare tensor, or the first element of a
    tuple) for feature. Raises ValueError when the output holds no such tensor."""
    if torch.is_tensor(output):
        return output
    if objective in (Objective.TOKEN_KL, Objective.CLASS_KL):
        logits = getattr(output, "logits", None)
        if not torch.is_tensor(logits):
            raise ValueError(f"objective {objective.value!r} needs logits, but the model "
                             f"returns {type(output).__name__} without them; use "
                             "DistillConfig(objective='feature') (or 'auto')")
        return logits
    hidden = getattr(output, "last_hidden_state", None)
    if torch.is_tensor(hidden):
        return hidden
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    logits = getattr(output, "logits", None)
    if torch.is_tensor(logits):
        return logits
    raise ValueError(f"cannot find the features in a {type(output).__name__} output: "
                     "expected a tensor, last_hidden_state or logits")


def objective_loss(objective: Objective, student: torch.Tensor, teacher: torch.Tensor,
                   mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """`objective` (not "auto": see `resolve`) between the student's and the teacher's
    `output_tensor`s; `mask` (B, T) is used by token_kl and feature, `temperature` by the
    KL objectives. A 0-d float32 tensor, 0 when the outputs are equal."""
    if objective == Objective.TOKEN_KL:
        return token_kl(student, teacher, mask, temperature)
    if objective == Objective.CLASS_KL:
        return class_kl(student, teacher, temperature)
    if objective == Objective.FEATURE:
        return feature_loss(student, teacher, mask)
    raise ValueError(f"objective {objective!r} must be resolved first (resolve())")
