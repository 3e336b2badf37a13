"""Nested elastic distillation: train every budget of one set of nested factors at once.

Each step samples a budget (uniform, user weights, or sandwich: largest + smallest + one
random, by the user weights when given), sets every layer to the plan's rank and
minimises the output-matching objective of the model's kind (`objectives`): KL(teacher ‖
student) on the logits at temperature T over the real tokens for language models, on the
class logits for classifiers, a feature loss on the last hidden state for encoders.
Optional learned uncertainty weights per budget (Nested Subspace Networks):
Σ_k exp(−s_k)·L_k + s_k.

Distribution is Accelerate's (DDP; FSDP through its config): each process takes its slice
of the global batch. Under FSDP2 (`fully_shard`, which turns the module it prepares into a
sharded one for good) a copy of the student is trained, its parameters DTensor shards;
checkpoints gather them (whole tensors: a run resumes on any number of processes) and the
trained tensors are copied back into the caller's model at the end. Budget and batch
choices come from a counter-based RNG seeded by (seed, step), identical on every process
and needing no state to resume. Checkpoints (trainable weights, optimizer state, step) are
safetensors, written atomically.

The student runs in eval mode while it trains (no dropout, batch-norm statistics frozen):
it imitates a deterministic teacher.

Precision: a float16/bfloat16 student is trained in float32 (fp32 master weights: AdamW's
second moments and eps underflow in float16, which turned 28 weight tensors into NaN
within 3 steps) and cast back to its dtype at the end; Accelerate's mixed precision
(DistillConfig.mixed_precision) runs the forward in half precision on a GPU. A non-finite
loss, gradient or weight stops training with NonFiniteError naming the step.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from flexrank.compress.anchor import AnchorReport, anchor_full_rank_, shared_columns
from flexrank.compress.calibration import BatchError, as_batch, takes_token_ids, to_device
from flexrank.compress.config import DistillConfig, Objective
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.depth_layers import stand_in_parameters
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.layers import balance_factors_
from flexrank.compress.objectives import (
    block_states,
    feature_terms,
    layer_loss,
    objective_loss,
    output_tensor,
    resolve,
    token_kl,
)
from flexrank.compress.qat import qat_start_, restore_
from flexrank.compress.select import nested_layers
from flexrank.io import atomic_dir

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
HALF_DTYPES = (torch.float16, torch.bfloat16)  # trained through float32 master weights


class NonFiniteError(ValueError):
    """Training produced NaN or inf (a loss, a gradient or a weight), at a named step."""


@dataclass
class DistillResult:
    steps_done: int
    tokens_seen: int
    losses: list[dict] = field(default_factory=list)  # per step: {budget: loss}
    evals: list[dict] = field(default_factory=list)  # {step, budgets: {β: {kl, ppl}}}
    anchor: AnchorReport | None = None  # the full budget's refit (DistillConfig.full_budget)
    # DistillConfig.balance_factors: the median |U_i| / |V_i| before balancing; None if not
    factor_norm_ratio: float | None = None


# ---- pure pieces ---------------------------------------------------------------------


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 mask: torch.Tensor | None, temperature: float = 1.0) -> torch.Tensor:
    """Mean over real tokens of T² · KL(softmax(t/T) ‖ softmax(s/T)) (`objectives.token_kl`)."""
    return token_kl(student_logits, teacher_logits, mask, temperature)


def budgets_for_step(budgets: Sequence[float], config: DistillConfig, step: int,
                     trained: int | None = None) -> list[int]:
    """Indices of the budgets trained at `step` (deterministic in (seed, step)), among the
    `trained` smallest of the ascending `budgets` (all of them by default; the full budget
    is left out when DistillConfig.full_budget is "refit": `trained_budgets`)."""
    rng = np.random.default_rng([config.seed, step, 0])
    weights = np.ones(len(budgets))
    if config.budget_weights is not None:
        if len(config.budget_weights) != len(budgets):
            raise ValueError(f"{len(config.budget_weights)} budget_weights for "
                             f"{len(budgets)} budgets")
        weights = np.asarray(config.budget_weights, dtype=float)
    k = len(budgets) if trained is None else trained
    weights = weights[:k]
    if k == 0:
        return []
    if config.sampler == "sandwich":  # the middle one drawn by weight among the others
        inner = weights[1:k - 1]
        middle = [1 + int(rng.choice(k - 2, p=inner / inner.sum()))] if inner.sum() > 0 else []
        return sorted({0, k - 1, *middle}, reverse=True)
    if config.sampler == "weighted":
        if weights.sum() <= 0:
            raise ValueError(f"budget_weights {list(config.budget_weights)} weigh only the "
                             "full budget, which full_budget='refit' does not train; weigh "
                             "a smaller budget, or set full_budget='anchor'")
        return [int(rng.choice(k, p=weights / weights.sum()))]
    return [int(rng.integers(0, k))]


def batch_indices(num_sequences: int, config: DistillConfig, step: int) -> np.ndarray:
    """Global batch of sequence indices for `step`: an epoch-wise permutation, seeded."""
    per_epoch = max(1, num_sequences // config.batch_size)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([config.seed, epoch, 1]).permutation(num_sequences)
    start = position * config.batch_size
    return order[start:start + config.batch_size] if num_sequences >= config.batch_size \
        else order[np.arange(start, start + config.batch_size) % num_sequences]


def lr_factor(step: int, config: DistillConfig) -> float:
    """Linear warm-up, then cosine from 1 to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


# ---- data ----------------------------------------------------------------------------


def stack_sequences(batches: Sequence, model: nn.Module) -> dict[str, torch.Tensor]:
    """One {input_ids, attention_mask} table, (N, T) each, from batches of `model`'s token
    ids in the form `flexrank.compress.calibration.as_batch` takes (dicts with input_ids,
    or bare (B, T) id tensors); batches of different lengths (sentences padded per batch)
    are right-padded to the longest, with id 0 and mask 0. Raises BatchError for other
    batches, or a model that does not read token ids."""
    rows = [as_batch(b, model) for b in batches]
    if not rows or not all(isinstance(b, dict) for b in rows):
        raise BatchError(f"distillation needs batches of token ids for a language model; "
                         f"{type(model).__name__} got {len(rows)} batch(es) of another kind")
    width = max(b["input_ids"].shape[1] for b in rows)

    def padded(key: str) -> torch.Tensor:
        return torch.cat([F.pad(b[key], (0, width - b[key].shape[1])) for b in rows])

    return {"input_ids": padded("input_ids"), "attention_mask": padded("attention_mask")}


def stack_batches(batches: Sequence, model: nn.Module) -> tuple[dict[str, torch.Tensor], bool]:
    """(one table of every input, positional): for a model that reads token ids,
    `stack_sequences`'s {input_ids, attention_mask}; for another model (vision, a plain
    nn.Module) its batches (tensors, tuples of tensors or dicts of tensors, all of one
    form) concatenated along the batch axis, as {input_0, input_1, ...} with positional
    True for tensors and tuples (the model is called as model(*values)), else by name.
    Raises BatchError for no batches or batches of mixed forms."""
    if takes_token_ids(model):
        return stack_sequences(batches, model), False
    rows = [as_batch(b, model) for b in batches]
    if not rows:
        raise BatchError(f"distillation needs at least one batch for {type(model).__name__}")
    positional = not isinstance(rows[0], dict)
    if positional:
        rows = [{f"input_{i}": t for i, t in enumerate((r,) if torch.is_tensor(r) else r)}
                for r in rows]
    keys = list(rows[0])
    for row in rows:
        if not isinstance(row, dict) or list(row) != keys or not all(
                torch.is_tensor(v) for v in row.values()):
            given = list(row) if isinstance(row, dict) else type(row).__name__
            raise BatchError(f"distillation batches for {type(model).__name__} must all have "
                             f"one form (tensors, tuples or dicts of tensors {keys}); got "
                             f"{given}")
    return {k: torch.cat([r[k] for r in rows]) for k in keys}, positional


def call(model: nn.Module, batch: dict[str, torch.Tensor], positional: bool):
    """`model`'s raw output on one `stack_batches` row set."""
    return model(*batch.values()) if positional else model(**batch)


def resolve_objective(objective, teacher: nn.Module, data: dict[str, torch.Tensor],
                      positional: bool) -> Objective:
    """`objective`, or for "auto" the one the teacher's output on the first input calls
    for (`objectives.resolve`)."""
    if Objective(objective) != Objective.AUTO:
        return Objective(objective)
    device = next(teacher.parameters()).device
    with torch.no_grad():
        first = call(teacher, {k: v[:1].to(device) for k, v in data.items()}, positional)
    chosen = resolve(objective, first)
    logger.debug("distillation objective: %s (auto, from %s's output)", chosen.value,
                type(teacher).__name__)
    return chosen


# ---- evaluation ----------------------------------------------------------------------


@torch.no_grad()
def evaluate_budgets(elastic: ElasticModel, teacher: nn.Module, batches: Sequence[dict],
                     objective: Objective | str = Objective.AUTO,
                     ) -> dict[float, dict[str, float]]:
    """Held-out figures at every budget, by objective (`objectives`; "auto" resolves from
    the teacher's output): every objective gives "loss" (its value, averaged over inputs);
    token_kl also "kl" (= loss, nats per token) and "ppl" (the student's perplexity);
    class_kl "top1" (share of inputs whose top class matches the teacher's); feature
    "cosine" (mean cosine of the mean-pooled embeddings to the teacher's). Batches as
    `flexrank.compress.calibration.as_batch` takes them."""
    model = elastic.model
    data, positional = stack_batches(batches[:1], model)  # the first input decides "auto"
    objective = resolve_objective(objective, teacher, data, positional)
    if objective != Objective.TOKEN_KL:
        return _evaluate_outputs(elastic, teacher, batches, objective, positional)
    batches = [as_batch(b, model) for b in batches]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results = {}
    teacher_logits = [teacher(**to_device(b, device)).logits for b in batches]
    for beta in elastic.budgets:
        elastic.set_budget(beta)
        kl_sum = nll_sum = tokens = 0.0
        for batch, t_logits in zip(batches, teacher_logits, strict=True):
            batch = to_device(batch, device)
            logits = model(**batch).logits.float()
            mask = batch["attention_mask"].float()
            n = float(mask.sum())
            kl_sum += float(distill_loss(logits, t_logits, mask)) * n
            shifted = mask[:, 1:]
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                  batch["input_ids"][:, 1:].reshape(-1), reduction="none")
            nll_sum += float((nll * shifted.reshape(-1)).sum())
            tokens += n
        predicted = sum(float(b["attention_mask"][:, 1:].sum()) for b in batches)
        results[beta] = {"loss": kl_sum / tokens, "kl": kl_sum / tokens,
                         "ppl": math.exp(nll_sum / predicted)}
    model.train(was_training)
    return results


def _evaluate_outputs(elastic: ElasticModel, teacher: nn.Module, batches: Sequence,
                      objective: Objective, positional: bool) -> dict[float, dict[str, float]]:
    """`evaluate_budgets` for class_kl and feature: per batch, weighted by its inputs."""
    model = elastic.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tables = [stack_batches([b], model)[0] for b in batches]
    tables = [{k: v.to(device) for k, v in t.items()} for t in tables]
    reference = [output_tensor(call(teacher, t, positional), objective) for t in tables]
    results = {}
    for beta in elastic.budgets:
        elastic.set_budget(beta)
        sums: dict[str, float] = {}
        count = 0
        for table, t_out in zip(tables, reference, strict=True):
            s_out = output_tensor(call(model, table, positional), objective).float()
            mask = table.get("attention_mask")
            rows = len(t_out)
            figures = {"loss": float(objective_loss(objective, s_out, t_out, mask))}
            if objective == Objective.CLASS_KL:
                figures["top1"] = float((s_out.argmax(-1) == t_out.argmax(-1)).float().mean())
            else:
                figures["cosine"] = 1 - float(feature_terms(s_out, t_out, mask)["pooled_cos"])
            for key, value in figures.items():
                sums[key] = sums.get(key, 0.0) + value * rows
            count += rows
        results[beta] = {key: value / count for key, value in sums.items()}
    model.train(was_training)
    return results


# ---- checkpoints ---------------------------------------------------------------------


def trainable_parameters(model: nn.Module, train_all: bool) -> dict[str, nn.Parameter]:
    if train_all:
        return dict(model.named_parameters())
    names = {}
    for layer_name, layer in nested_layers(model).items():
        for pname, param in layer.named_parameters():
            names[f"{layer_name}.{pname}"] = param
    return names | stand_in_parameters(model)  # a joint plan's stand-in blocks (issue 18)


def save_checkpoint(directory: Path, step: int, params: dict[str, torch.Tensor],
                    optimizer_state: dict, extra: dict) -> None:
    """Trainable weights, optimizer state (`Optimizer.state_dict()`, whole tensors) and
    step, atomically (a crash keeps the last)."""
    tensors, scalars = {}, {}
    for index, per_param in optimizer_state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    meta = {"step": step, "param_groups": optimizer_state["param_groups"], "scalars": scalars,
            **extra}
    with atomic_dir(directory) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()},
                  str(tmp / "weights.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))


def load_checkpoint(directory: Path, params: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer) -> dict:
    """Load `save_checkpoint`'s folder into `params` and `optimizer`; returns its metadata.
    Whole tensors go into DTensor shards (FSDP2) as each parameter is sharded, on any
    number of processes (every process must call it: scattering is a collective)."""
    meta = json.loads((directory / "state.json").read_text())
    weights = load_file(str(directory / "weights.safetensors"))
    if set(weights) != set(params):
        raise ValueError(f"checkpoint {directory} trains other parameters than this run "
                         "(different model, plan or train_all); use a new output folder")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(_shard_like(param, weights[name]))
    tensors = load_file(str(directory / "optimizer.safetensors"))
    in_order = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        param = in_order[int(index)]
        if name != "step":  # AdamW's moments, sharded as their parameter
            value = _shard_like(param, value)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (an all-gather: every process must call it), else `tensor`."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor, else `tensor`."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _shard_like(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole` (a parameter's full shape) laid out as `param`: sharded the same way when
    `param` is a DTensor (a scatter: every process must call it), else as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return whole
    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements)


def _gathered(values: dict, keep: bool) -> dict:
    """`values` with each tensor whole, gathered one at a time (under FSDP2 every process
    must call it, in the same order); kept, on the CPU, only where `keep` (the writer), so
    no process holds more than one gathered tensor beyond what it keeps."""
    out = {}
    for key, value in values.items():
        if not torch.is_tensor(value):
            out[key] = value
            continue
        whole = _full(value.detach())
        if keep:
            out[key] = whole.cpu()
        del whole
    return out


def _sharded(accelerator, config: DistillConfig) -> bool:
    """Accelerate prepares the student with FSDP2: its parameters become DTensor shards.
    Raises ValueError under FSDP1 (its flat parameters are not handled here) or with
    uncertainty weights (not a model parameter FSDP can shard)."""
    if getattr(accelerator, "distributed_type", None) != "FSDP":
        return False
    if not accelerator.is_fsdp2:
        raise ValueError("distill supports FSDP version 2 only: set fsdp_version: 2 in the "
                         "Accelerate config (examples/accelerate/fsdp.yaml), or use DDP")
    if config.uncertainty_weights:
        raise ValueError("DistillConfig.uncertainty_weights is not supported under FSDP (its "
                         "per-budget weights are not a model parameter FSDP can shard): set "
                         "it to False, or distil with DDP")
    return True


# ---- the loop ------------------------------------------------------------------------


def _make_accelerator(config: DistillConfig):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if cuda else "no"
    return Accelerator(cpu=not cuda, mixed_precision=precision)


@dataclass
class _Run:
    """What one distillation run carries from step to step."""

    elastic: ElasticModel  # the student and its plan; set_budget switches every layer
    wrapped: nn.Module  # the student as Accelerate prepared it (DDP-wrapped under DDP)
    teacher: nn.Module
    optimizer: torch.optim.Optimizer | None  # None once training is over (under FSDP)
    trained: dict[str, torch.Tensor]  # every tensor the optimizer updates, by name
    log_vars: nn.Parameter | None  # one uncertainty weight per budget, or None
    data: dict[str, torch.Tensor]  # every input, (N, ...) each (`stack_batches`)
    accelerator: object
    config: DistillConfig
    objective: Objective = Objective.TOKEN_KL  # resolved (never "auto")
    positional: bool = False  # the model takes data's values positionally
    sharded: bool = False  # FSDP2: `elastic` is a sharded copy, run by every process at once


def check_intermediate(config: DistillConfig, model: nn.Module, positional: bool) -> None:
    """ValueError when `config.intermediate_weight` asks for per-block matching of a model
    whose inputs go positionally (it is called with output_hidden_states=True, a keyword).
    `positional` as `stack_batches` returns it."""
    if config.intermediate_weight and positional:
        raise ValueError(f"DistillConfig.intermediate_weight {config.intermediate_weight} needs "
                         f"a model called by keyword (output_hidden_states=True); "
                         f"{type(model).__name__} takes its inputs positionally: set it to 0 "
                         "(flexrank compress --intermediate-weight)")


def distill(model: nn.Module, teacher: nn.Module, plan, batches: Sequence[dict],
            config: DistillConfig | None = None, eval_batches: Sequence[dict] | None = None,
            output_dir: str | os.PathLike | None = None, accelerator=None,
            progress: bool = True) -> DistillResult:
    """Train the nested factors of `model` (factorised, DataSVD-initialised) so that every
    budget of `plan` imitates `teacher`. With `output_dir`, checkpoints go to
    output_dir/checkpoint and a run there resumes from the last one exactly.

    Batches (and `eval_batches`) as `flexrank.compress.calibration.as_batch` takes them:
    for a model that reads token ids, dicts with input_ids (B, T) and optionally
    attention_mask, or bare (B, T) integer tensors; for another model (ViT, a CNN) the
    tensor, tuple or dict of tensors its forward takes, e.g. pixel values (B, C, H, W).
    `config.objective` says what is matched ("auto": token KL for language models, class
    KL for classifiers, the feature loss for encoders; `objectives.resolve`). With
    `config.balance_factors` each rank component's U and V columns are first scaled to
    equal norms (`layers.balance_factors_`; every budget unchanged), the median ratio
    before in `DistillResult.factor_norm_ratio`.

    Mutates, in place, and leaves on return:
    - `model`: the trained parameters (the nested layers' factors and biases; every
      parameter with `train_all`) hold their trained values; every parameter has
      requires_grad=False; the model is in eval mode, with every nested layer at its rank
      for the plan's largest budget (layers the plan does not name at their max rank), as
      `ElasticModel(model, plan).set_budget(max(plan.budgets))` sets them. Every tensor
      keeps its dtype: float16/bfloat16 ones are trained in float32 (master weights) and
      cast back at the end (also when training stops with an error).
    - `teacher`: every parameter requires_grad=False, eval mode, on Accelerate's device.
    - output_dir/checkpoint: the last checkpoint (step `config.steps`).

    Raises ValueError when `config.batch_size` is not divisible by the number of
    processes, or when the plan does not fit the model (see ElasticModel); BatchError for
    batches in another form; NonFiniteError, naming the step, when a loss, gradient or
    trained weight becomes NaN or inf (on every process at once under DDP or FSDP).
    """
    config = config or DistillConfig()
    accelerator = accelerator or _make_accelerator(config)
    elastic = ElasticModel(model, plan)
    data, positional = stack_batches(batches, model)
    eval_batches = [as_batch(b, model) for b in eval_batches] if eval_batches else None
    if config.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the "
                         f"{accelerator.num_processes} processes")
    _freeze_(teacher)
    teacher.eval()
    objective = resolve_objective(config.objective, teacher, data, positional)
    check_intermediate(config, model, positional)
    half = _upcast_half_(model)
    # in float32 (the master weights), so a half model's budgets change only by its rounding;
    # a resumed run's checkpoint replaces these values with its own (balanced at its start)
    ratio = balance_factors_(nested_layers(model).values()) if config.balance_factors \
        else None
    quantized = qat_start_(model, config)  # DistillConfig.qat: each budget as it ships
    try:
        result = _distill(model, elastic, teacher, data, config, eval_batches, output_dir,
                          accelerator, progress, objective, positional)
        result.factor_norm_ratio = ratio
    finally:
        restore_(quantized)
        _restore_dtypes_(model, half)
    elastic.set_budget(elastic.budgets[-1])  # ascending: the largest
    model.eval()
    _freeze_(model)
    return result


def _distill(model: nn.Module, elastic: ElasticModel, teacher: nn.Module,
             data: dict[str, torch.Tensor], config: DistillConfig, eval_batches,
             output_dir, accelerator, progress: bool, objective: Objective = Objective.TOKEN_KL,
             positional: bool = False) -> DistillResult:
    """The run itself: optimizer, resume, training steps, last checkpoint, evaluations."""
    sharded = _sharded(accelerator, config)
    # fully_shard turns the module it prepares into a sharded one for good: train a copy
    trainee = copy.deepcopy(model) if sharded else model
    run_elastic = ElasticModel(trainee, elastic.plan) if sharded else elastic
    params = _train_only_(trainee, config.train_all)
    names = list(params)
    log_vars = nn.Parameter(torch.zeros(len(elastic.budgets))) \
        if config.uncertainty_weights else None
    optimizer = _optimizer(params, log_vars, config)
    del params  # under FSDP2 the unsharded tensors are freed once fully_shard has copied them
    wrapped, optimizer = accelerator.prepare(trainee, optimizer)
    saved = _prepared_parameters(names, optimizer, log_vars)
    ckpt = Path(output_dir) / CHECKPOINT_DIR if output_dir else None
    start_step = _resume(ckpt, saved, getattr(optimizer, "optimizer", optimizer))
    run = _Run(run_elastic, wrapped, teacher.to(accelerator.device), optimizer, dict(saved),
               log_vars, data, accelerator, config, objective, positional, sharded)
    result = DistillResult(steps_done=start_step, tokens_seen=0)
    if eval_batches and _evaluates_here(run) and start_step == 0:
        _evaluate(run, eval_batches, 0, result)
    _train(run, start_step, result, ckpt, saved, eval_batches, progress)
    if ckpt is not None and config.steps > start_step:
        _checkpoint(accelerator, ckpt, config.steps, saved, optimizer, config)
    if sharded:  # the trained tensors, whole, into the caller's model; the copy is dropped
        _copy_back_(model, {name: saved[name] for name in names}, accelerator.device)
        run = replace(run, elastic=elastic, wrapped=model, optimizer=None, trained={},
                      sharded=False)
        del trainee, run_elastic, wrapped, optimizer, saved
        accelerator.free_memory()  # its references to the sharded copy and its optimizer
    # never trained (no step now, none in a resumed checkpoint), the factors are DataSVD's,
    # whose full rank is the original layer already (U Vᵀ = W): the refit's covariance
    # pass would only cost time (~8 min for SmolLM2)
    if result.steps_done > 0 and config.full_budget != "train" and \
            shared_columns(elastic.plan, elastic.layers):
        result.anchor = _anchor_full_budget(run, progress)
    if eval_batches and accelerator.is_main_process and \
            (not result.evals or result.evals[-1]["step"] != config.steps):
        _evaluate(run, eval_batches, config.steps, result)
    return result


def _prepared_parameters(names: list[str], optimizer, log_vars: nn.Parameter | None
                         ) -> dict[str, torch.Tensor]:
    """The trained tensors by name as the optimizer holds them after Accelerate's prepare:
    the same under DDP; under FSDP2 the DTensor shards that replaced them, which Accelerate
    maps into the optimizer in order (the module's own names would carry activation
    checkpointing's wrapper prefix). `names` in the order of `_optimizer`'s first group."""
    groups = getattr(optimizer, "optimizer", optimizer).param_groups
    saved = dict(zip(names, groups[0]["params"], strict=True))
    if log_vars is not None:
        saved["_log_vars"] = groups[1]["params"][0]
    return saved


def _copy_back_(model: nn.Module, params: dict[str, nn.Parameter], device) -> None:
    """Each of `params` (a sharded copy's, by name) whole into `model`'s parameter of that
    name, `model` moved to `device` as Accelerate moves a DDP student (every process calls
    it: the gathers are collectives)."""
    model.to(device)
    with torch.no_grad():
        for name, param in params.items():
            model.get_parameter(name).copy_(_full(param.detach()))


def _evaluates_here(run: _Run) -> bool:
    """Held-out evaluation runs on the main process; under FSDP on every process (each
    forward gathers the shards, a collective), on the same batches."""
    return run.sharded or run.accelerator.is_main_process


def trained_budgets(elastic: ElasticModel, config: DistillConfig) -> int:
    """How many of the plan's budgets, the smallest, distillation trains: every one, or
    all but the full budget (β = 1, every layer at full rank) when `config.full_budget` is
    "refit" (it is only refit to the original weights after training: `anchor`)."""
    anchored = config.full_budget == "refit" and \
        shared_columns(elastic.plan, elastic.layers) is not None
    return len(elastic.budgets) - int(anchored)


def _anchor_full_budget(run: _Run, progress: bool) -> AnchorReport | None:
    """Refit the columns only the full budget reads to the teacher's weights, in the norm
    of the teacher's layer inputs on the training data (its covariances, collected here)."""
    model = run.accelerator.unwrap_model(run.wrapped)
    data, size = run.data, run.config.batch_size
    rows = len(next(iter(data.values())))
    batches = [_trim_padding({k: v[i:i + size] for k, v in data.items()}, "cpu")
               for i in range(0, rows, size)]
    if getattr(run, "positional", False):  # a model called as model(*inputs)
        batches = [next(iter(b.values())) for b in batches] if len(data) == 1 else None
    stats = None
    if batches is not None:
        stats = collect_covariances(run.teacher, batches, progress=progress, reduce=False)
    else:
        logger.info("the full budget is refit in the Frobenius norm: covariances are "
                    "collected for models called with one input or named inputs")
    return anchor_full_rank_(model, run.teacher, run.elastic.plan, stats, progress=progress)


def _upcast_half_(model: nn.Module) -> dict[tuple[str, str], torch.dtype]:
    """Cast every float16/bfloat16 parameter and buffer of `model` to float32 in place
    (parameters stay the same objects, so the optimizer updates float32 master weights);
    returns {("param" | "buffer", name): original dtype} for `_restore_dtypes_`."""
    cast = {}
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied tensor once
            if param.dtype in HALF_DTYPES:
                cast["param", name] = param.dtype
                param.data = param.data.float()
        for name, buffer in model.named_buffers():
            if buffer.dtype in HALF_DTYPES:
                cast["buffer", name] = buffer.dtype
                _set_buffer(model, name, buffer.float())
    if cast:
        logger.info("training the %s student in float32 (master weights); %d tensors are "
                    "cast back at the end", sorted({str(d) for d in cast.values()}), len(cast))
    return cast


def _restore_dtypes_(model: nn.Module, dtypes: dict[tuple[str, str], torch.dtype]) -> None:
    """Cast the tensors `_upcast_half_` upcast back to their dtypes, in place."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    with torch.no_grad():
        for (kind, name), dtype in dtypes.items():
            if kind == "param":
                params[name].data = params[name].data.to(dtype)
            else:
                _set_buffer(model, name, buffers[name].to(dtype))


def _set_buffer(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, value)


def _freeze_(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _train_only_(model: nn.Module, train_all: bool) -> dict[str, nn.Parameter]:
    """Freeze `model` except the parameters distillation trains; returns those, by name."""
    params = trainable_parameters(model, train_all)
    _freeze_(model)
    for p in params.values():
        p.requires_grad_(True)
    return params


def _optimizer(params: dict[str, nn.Parameter], log_vars: nn.Parameter | None,
               config: DistillConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(params.values()), "weight_decay": config.weight_decay}]
    if log_vars is not None:  # no decay: it would pull every budget's weight to 1
        groups.append({"params": [log_vars], "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=config.lr)


def _resume(ckpt: Path | None, saved: dict[str, torch.Tensor],
            optimizer: torch.optim.Optimizer) -> int:
    """The step to start from: the checkpoint's (its weights and optimizer state loaded
    into `saved` and `optimizer`), or 0 when there is none."""
    if ckpt is None or not (ckpt / "state.json").is_file():
        return 0
    step = load_checkpoint(ckpt, saved, optimizer)["step"]
    logger.info("resuming distillation at step %d from %s", step, ckpt)
    return step


def _evaluate(run: _Run, eval_batches: Sequence[dict], step: int, result: DistillResult):
    result.evals.append({"step": step, "budgets": evaluate_budgets(
        run.elastic, run.teacher, eval_batches, run.objective)})


def _train(run: _Run, start_step: int, result: DistillResult, ckpt: Path | None,
           saved: dict[str, torch.Tensor], eval_batches, progress: bool) -> None:
    """Steps start_step … config.steps − 1, with periodic checkpoints and evaluations."""
    config, accelerator = run.config, run.accelerator
    running: dict[float, float] = {}  # exponential moving average of each budget's loss
    bar = tqdm(range(start_step, config.steps), desc="distill", unit="step",
               disable=not progress or not accelerator.is_main_process,
               initial=start_step, total=config.steps)
    # eval mode: the student matches the teacher's deterministic outputs, so no dropout
    # (on a tiny BERT, dropout 0.1 made every budget's held-out feature loss worse after
    # training; issue 19) and batch-norm statistics stay the teacher's
    run.wrapped.eval()
    for step in bar:
        step_losses, tokens = _step(run, step)
        result.tokens_seen += tokens
        result.losses.append(step_losses)
        for beta, value in step_losses.items():
            running[beta] = value if beta not in running else 0.9 * running[beta] + 0.1 * value
        bar.set_postfix({f"β{b:g}": f"{v:.3g}" for b, v in sorted(running.items())})
        done = result.steps_done = step + 1
        if ckpt is not None and config.checkpoint_every and done % config.checkpoint_every == 0 \
                and done < config.steps:
            _checkpoint(accelerator, ckpt, done, saved, run.optimizer, config)
        if eval_batches and config.eval_every and done % config.eval_every == 0 \
                and _evaluates_here(run):
            _evaluate(run, eval_batches, done, result)


def _step(run: _Run, step: int) -> tuple[dict[float, float], int]:
    """One optimizer step over config.grad_accum micro-batches and the step's budgets.
    Returns ({budget: loss of its last micro-batch}, tokens seen by all processes)."""
    config, accelerator = run.config, run.accelerator
    for group in run.optimizer.param_groups:  # the schedule is a pure function of the step
        group["lr"] = config.lr * lr_factor(step, config)
    chosen = budgets_for_step(run.elastic.budgets, config, step, trained_budgets(run.elastic,
                                                                                  config))
    step_losses: dict[float, float] = {}
    tokens = 0
    non_finite = None  # this process's first NaN/inf loss: (budget, loss, teacher finite?)
    for micro in range(config.grad_accum):
        batch = _local_batch(run, step * config.grad_accum + micro)
        with torch.no_grad():
            raw = call(run.teacher, _with_states(batch, config), run.positional)
            teacher_logits = output_tensor(raw, run.objective)
            teacher_states = block_states(raw) if config.intermediate_weight else None
        for position, k in enumerate(chosen):
            last = micro == config.grad_accum - 1 and position == len(chosen) - 1
            loss = _backward(run, batch, teacher_logits, k, len(chosen), sync=last,
                             teacher_states=teacher_states)
            if not math.isfinite(loss) and non_finite is None:
                non_finite = (run.elastic.budgets[k], loss,
                              bool(torch.isfinite(teacher_logits).all()))
            step_losses[run.elastic.budgets[k]] = loss
        # tokens for token-id models, else inputs (images, rows)
        seen = batch["attention_mask"].sum() if "attention_mask" in batch \
            else len(next(iter(batch.values())))
        tokens += int(seen) * accelerator.num_processes
    _check_losses(run, step, non_finite)
    if getattr(accelerator, "scaler", None) is None:  # a GradScaler skips such steps itself
        _check_gradients(run, step)  # before clipping, which spreads a NaN to every tensor
    accelerator.clip_grad_norm_(list(run.trained.values()), config.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    _check_weights(run, step)
    return step_losses, tokens


DIVERGED_ADVICE = ("lower DistillConfig.lr or max_grad_norm, check the batches, and rerun "
                   "(a run with output_dir resumes from its last checkpoint)")


def _check_losses(run: _Run, step: int, non_finite: tuple[float, float, bool] | None) -> None:
    """NonFiniteError on every process when any process's loss was NaN or inf this step,
    before the optimizer step. Each process finishes its step's backward passes first and
    the processes agree through one all-reduce: a process that raised alone would leave
    the others waiting in the next collective (with torchrun they are killed without a
    word; across nodes they wait for the collective's timeout). `non_finite`: this
    process's first NaN/inf loss as (budget, loss, whether the teacher's outputs were
    finite), or None."""
    accelerator = run.accelerator
    others = 0
    if accelerator.num_processes > 1:
        flags = torch.zeros(accelerator.num_processes, dtype=torch.int32,
                            device=accelerator.device)
        flags[accelerator.process_index] = non_finite is not None
        torch.distributed.all_reduce(flags)
        others = int(flags.sum()) - (non_finite is not None)
    if non_finite is not None:
        _loss_error(run, step, *non_finite)
    if others:
        bad = [i for i, flag in enumerate(flags.tolist()) if flag]
        raise NonFiniteError(f"distillation step {step}: the loss is NaN/inf on process(es) "
                             f"{bad} of {accelerator.num_processes} (their error says why); "
                             f"the weights were not updated; {DIVERGED_ADVICE}")


def _check_gradients(run: _Run, step: int) -> None:
    """NonFiniteError before the optimizer step when a gradient is NaN or inf."""
    grads = {name: p.grad for name, p in run.trained.items() if p.grad is not None}
    finite = _all_finite(grads, run.accelerator.device if run.sharded else None)
    if finite is None:
        return
    bad = [name for name, ok in zip(grads, finite, strict=True) if not ok]
    raise NonFiniteError(f"distillation step {step}: the gradients of {len(bad)} tensors are "
                         f"NaN/inf (first {bad[:3]}); the weights were not updated; "
                         f"{DIVERGED_ADVICE}")


def _check_weights(run: _Run, step: int) -> None:
    """NonFiniteError when the optimizer step left a trained tensor NaN or inf."""
    finite = _all_finite(run.trained, run.accelerator.device if run.sharded else None)
    if finite is None:
        return
    bad = [name for name, ok in zip(run.trained, finite, strict=True) if not ok]
    raise NonFiniteError(f"distillation step {step}: after the optimizer step {len(bad)} "
                         f"trained tensors hold NaN/inf (first {bad[:3]}); {DIVERGED_ADVICE}")


def _all_finite(tensors: dict[str, torch.Tensor],
                agree_on: torch.device | None = None) -> list[bool] | None:
    """None when every tensor is finite (one device sync), else a flag per tensor. With
    `agree_on` (sharded, DTensor tensors: the accelerator's device) each process checks
    its shards and the flags are agreed over the processes there (else one would raise
    while the others wait in the next collective); on that device, not the shards', which
    are on the CPU when FSDP offloads them and NCCL reduces only GPU tensors."""
    if not tensors:
        return None
    finite = torch.stack([torch.isfinite(_local(t)).all() for t in tensors.values()])
    if agree_on is not None:
        finite = finite.to(device=agree_on, dtype=torch.int32)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        finite = finite.bool()
    return None if bool(finite.all()) else finite.tolist()


def _local_batch(run: _Run, draw: int) -> dict[str, torch.Tensor]:
    """This process's slice of global batch number `draw`, on its device."""
    accelerator = run.accelerator
    idx = batch_indices(len(next(iter(run.data.values()))), run.config, draw)
    local = torch.as_tensor(idx[accelerator.process_index::accelerator.num_processes])
    return _trim_padding({k: v[local] for k, v in run.data.items()}, accelerator.device)


def _trim_padding(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """`batch` on `device` without its trailing columns that are padding in every row
    (attention_mask 0): `stack_sequences` pads every sentence to the longest of the whole
    set, and an encoder's cost grows with the width (on MiniLM's tinyshakespeare sentences,
    mean 22 tokens padded to 128). Exact: right padding is masked out of attention and of
    every objective. Batches without an (N, T) attention_mask are unchanged."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        columns = mask.ne(0).any(0).nonzero()
        width = int(columns.max()) + 1 if len(columns) else 1
        if width < mask.shape[1]:
            batch = {k: v[:, :width] if v.dim() >= 2 and v.shape[:2] == mask.shape else v
                     for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def _with_states(batch: dict[str, torch.Tensor], config: DistillConfig) -> dict:
    """`batch`, asking for the blocks' hidden states when intermediate matching is on."""
    return batch | {"output_hidden_states": True} if config.intermediate_weight else batch


def _backward(run: _Run, batch: dict[str, torch.Tensor], teacher_logits: torch.Tensor,
              k: int, num_chosen: int, sync: bool,
              teacher_states: tuple[torch.Tensor, ...] | None = None) -> float:
    """Accumulate the gradient of budget k's loss on `batch` (plus intermediate_weight ×
    `layer_loss` to `teacher_states` when given); gradients are synchronised across
    processes only on the step's last backward (`sync`). Returns the raw output loss."""
    config, accelerator = run.config, run.accelerator
    run.elastic.set_budget(run.elastic.budgets[k])
    with accelerator.autocast():
        out = call(run.wrapped, _with_states(batch, config), run.positional)
        loss = objective_loss(run.objective, output_tensor(out, run.objective),
                              teacher_logits, batch.get("attention_mask"), config.temperature)
    raw = float(loss.detach())
    if teacher_states is not None:
        loss = loss + config.intermediate_weight * layer_loss(
            block_states(out), teacher_states, batch.get("attention_mask"))
    if run.log_vars is not None:  # Σ_k exp(−s_k)·L_k + s_k
        loss = torch.exp(-run.log_vars[k]) * loss + run.log_vars[k]
    loss = loss / (config.grad_accum * num_chosen)
    if sync:
        accelerator.backward(loss)
    else:
        with accelerator.no_sync(run.wrapped):
            accelerator.backward(loss)
    return raw


def _loss_error(run: _Run, step: int, beta: float, loss: float, teacher_finite: bool) -> None:
    """NonFiniteError for a NaN/inf loss, saying where it came from."""
    if not teacher_finite:
        dtype = getattr(next(run.teacher.parameters(), None), "dtype", "unknown")
        cause = (f"the teacher's outputs are not finite (its dtype: {dtype}; a float16 "
                 "teacher can overflow: load it in bfloat16 or float32)")
    else:
        bad = [name for name, p in run.trained.items() if not torch.isfinite(_local(p)).all()]
        cause = (f"trained tensors hold NaN/inf: {bad[:3]}" if bad else
                 "the student's outputs are not finite although its trained weights are")
    raise NonFiniteError(f"distillation step {step}: the loss at budget {beta:g} is {loss}; "
                         f"{cause}; {DIVERGED_ADVICE}")


def _checkpoint(accelerator, ckpt: Path, step: int, params, optimizer, config) -> None:
    """The main process writes the checkpoint; under FSDP2 every process first gathers
    the shards (whole tensors), so that any number of processes can resume it."""
    keep = accelerator.is_main_process
    weights = _gathered(params, keep)
    state = getattr(optimizer, "optimizer", optimizer).state_dict()
    state = {**state, "state": {index: _gathered(per_param, keep)
                                for index, per_param in state["state"].items()}}
    accelerator.wait_for_everyone()
    if keep:
        save_checkpoint(ckpt, step, weights, state, {"config": config.to_dict()})
    accelerator.wait_for_everyone()
