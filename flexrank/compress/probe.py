"""Sensitivity probing: S[l, k] = damage when only layer l is cut to candidate rank k.

Damage is the distillation objective of the model's kind (`objectives.resolve`): KL(teacher
‖ model) per token for language models (always ≥ 0, steadier than a loss difference), per
input on the class logits of classifiers, the feature loss on the last hidden state of
encoders without a head.

Cost control (DESIGN.md §4.3):
- block outputs of the full-rank model are cached once; probing a layer in block b swaps
  blocks 0…b−1 for their cached outputs, so only blocks b…end run;
- `fast` mode probes a few ranks per layer and fills the others from the layer's exact
  tail-energy curve, scaled to the probed points;
- the matrix is saved after every layer, so an interrupted probe resumes;
- `fisher` mode (language models) measures no pass per layer: each layer's KL at every
  rank comes from a second-order expansion, KL ≈ ½ δᵀ F δ, with F the Fisher information
  of the model's output distribution with respect to the layer's output and δ the output
  change of the truncation, from a few backward passes of the whole model (`fisher_rows`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flexrank.compress.calibration import as_batch, to_device
from flexrank.compress.config import (
    Objective,
    ProbeConfig,
    ProbeMode,
    without_inert_probe_settings,
)
from flexrank.compress.layers import NESTED_TYPES, NestedLinear, dense_at_max_rank
from flexrank.compress.objectives import objective_loss, output_tensor, resolve
from flexrank.compress.select import nested_layers
from flexrank.io import write_json_atomic
from flexrank.planning.sensitivity import Sensitivity

logger = logging.getLogger(__name__)

MIN_DAMAGE = 1e-12


def candidate_ranks(max_rank: int, num_levels: int, rank_multiple: int) -> list[int]:
    """`num_levels` strictly increasing ranks ending at `max_rank`, evenly spread over
    (0, max_rank], multiples of `rank_multiple` where there is room for that many."""
    if max_rank < num_levels:
        raise ValueError(f"a layer of max rank {max_rank} cannot have {num_levels} levels")
    step = rank_multiple if max_rank // rank_multiple >= num_levels else 1
    ranks = []
    for k in range(1, num_levels + 1):
        r = k * max_rank / num_levels
        r = max(step, int(round(r / step)) * step)
        ranks.append(min(r, max_rank))
    ranks[-1] = max_rank
    for k in range(len(ranks) - 2, -1, -1):  # de-duplicate from the top down
        ranks[k] = min(ranks[k], ranks[k + 1] - 1)
    if ranks[0] < 1:
        raise ValueError(f"cannot place {num_levels} distinct ranks under {max_rank}")
    return ranks


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the ModuleList holding the most nested layers ([] if none)."""
    best, best_count = [], 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            count = sum(isinstance(m, NESTED_TYPES) for m in module.modules())
            if count > best_count:
                best, best_count = list(module), count
    return best


def _output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is not None:
        return logits
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def _forward(model: nn.Module, batch):
    if not isinstance(batch, Mapping):
        return model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    if getattr(getattr(model, "config", None), "use_cache", False) and _takes(model, "use_cache"):
        batch = {**batch, "use_cache": False}  # a KV cache would be mutated between runs
    return model(**batch)


def _takes(model: nn.Module, name: str) -> bool:
    """Whether `model`'s forward has a parameter `name` (BertForSequenceClassification's
    config says use_cache, but its forward does not take it)."""
    return name in inspect.signature(model.forward).parameters


def _run(model: nn.Module, batch) -> torch.Tensor:
    return _output(_forward(model, batch)).float()


class Damage:
    """Teacher outputs on the probe batches, and the damage of a student output.

    With `top_k` > 0 (language models), the KL is taken over each token's top_k teacher
    tokens, both distributions renormalised over them, and the student's LM head computes
    only the logits of the batch's union of those tokens (`head_for`): the 49,152-wide
    head and its full-vocabulary softmax are about a third of a SmolLM2 probe pass. The
    probability mass outside the teacher's top_k is ignored (BENCHMARKS.md, issue 20,
    compares this with the full-vocabulary KL)."""

    def __init__(self, teacher_outputs: list[torch.Tensor], is_lm: bool,
                 masks: list[torch.Tensor | None], objective: Objective | None = None,
                 top_k: int = 0):
        # objective: class_kl or feature for models that are not language models (None:
        # the output's squared error relative to the teacher's energy)
        self.is_lm = is_lm
        self.objective = None if is_lm else objective
        self.masks = masks
        self.top_k = top_k if is_lm else 0
        self.union: list[torch.Tensor | None] = [None] * len(teacher_outputs)
        self.position: list[torch.Tensor | None] = [None] * len(teacher_outputs)
        if self.top_k:
            self.reference = []
            for i, logits in enumerate(teacher_outputs):
                values, ids = logits.topk(min(self.top_k, logits.shape[-1]), -1)  # (B, T, k)
                self.union[i] = ids.unique()  # sorted token ids, (U,)
                self.position[i] = torch.searchsorted(self.union[i], ids)  # (B, T, k)
                self.reference.append(F.log_softmax(values, -1))
        elif is_lm:
            self.reference = [F.log_softmax(t, -1) for t in teacher_outputs]
        else:
            self.reference = teacher_outputs

    @contextmanager
    def head_for(self, model: nn.Module, index: int):
        """With top_k: the model's LM head computes only batch `index`'s union of teacher
        top-k tokens (its logits are (B, T, U)); elementwise work after the head (scaling,
        soft-capping) still applies. Without top_k: nothing changes."""
        if not self.top_k:
            yield
            return
        head = model.get_output_embeddings()
        rows = self.union[index].to(head.weight.device)
        weight = head.weight[rows]  # (U, hidden)
        bias = head.bias[rows] if head.bias is not None else None
        head.forward = lambda x: F.linear(x, weight, bias)
        try:
            yield
        finally:
            del head.forward

    def __call__(self, index: int, output: torch.Tensor) -> float:
        ref, mask = self.reference[index], self.masks[index]
        if self.is_lm:
            if self.top_k:  # the student's logits at the teacher's top-k tokens: (B, T, k)
                output = output.gather(-1, self.position[index].to(output.device))
            # KL(teacher ‖ student) per token: Σ p_t (log p_t − log p_s)
            kl = F.kl_div(F.log_softmax(output, -1), ref, log_target=True, reduction="none")
            per_token = kl.sum(-1)
            if mask is not None:
                value = float((per_token * mask).sum() / mask.sum())
            else:
                value = float(per_token.mean())
            # KL ≥ 0, but float32 rounding near full rank can dip below; a tiny positive
            # floor keeps "full rank is strictly best" so β = 1 plans the original model
            return max(value, MIN_DAMAGE)
        if self.objective is not None:  # per input (class_kl) or per real token (feature)
            return max(float(objective_loss(self.objective, output, ref, mask)), MIN_DAMAGE)
        value = float((output - ref).square().sum() / ref.square().sum().clamp_min(1e-30))
        return max(value, MIN_DAMAGE)

    @property
    def metric(self) -> str:
        return "kl" if self.is_lm else self.objective.value if self.objective else "rel_mse"


class BlockCache:
    """Full-rank outputs of every block for every probe batch, and the swap that reuses them."""

    def __init__(self, blocks: Sequence[nn.Module]):
        self.blocks = list(blocks)
        self.outputs: list[list] = []  # [batch][block]

    @torch.no_grad()
    def fill(self, model: nn.Module, batches: Sequence) -> None:
        for batch in batches:
            per_block = [None] * len(self.blocks)
            handles = [block.register_forward_hook(self._keeper(per_block, i))
                       for i, block in enumerate(self.blocks)]
            try:
                _run(model, batch)
            finally:
                for h in handles:
                    h.remove()
            self.outputs.append(per_block)

    @staticmethod
    def _keeper(store: list, index: int):
        def hook(module, args, output):
            store[index] = output
        return hook

    @contextmanager
    def skip_before(self, batch_index: int, first_block: int):
        """Blocks < first_block return their cached output instead of computing it."""
        patched = []
        try:
            for i in range(first_block):
                cached = self.outputs[batch_index][i]
                self.blocks[i].forward = lambda *a, _c=cached, **k: _c
                patched.append(self.blocks[i])
            yield
        finally:
            for block in patched:
                del block.forward


def _block_of(layers: Mapping[str, nn.Module], blocks: Sequence[nn.Module]) -> dict[str, int]:
    """Block index of each layer (0 when it lives outside the blocks: nothing is skipped)."""
    owner = {}
    for index, block in enumerate(blocks):
        for module in block.modules():
            owner[id(module)] = index
    return {name: owner.get(id(layer), 0) for name, layer in layers.items()}


def _fill_from_tail(sigma: torch.Tensor, ranks: list[int], probed: dict[int, float]) -> list[float]:
    """Errors at every level from the probed ones: the ratio damage / tail energy is
    interpolated (log-linear in rank) between probed levels, constant beyond them."""
    sq = sigma.double().square()
    return _fill_from_curve([float(sq[r:].sum()) for r in ranks], ranks, probed)


def _fill_from_curve(tail: list[float], ranks: list[int], probed: dict[int, float]) -> list[float]:
    """Errors at every level from the probed ones and a proxy curve `tail` (one value per
    level): the ratio damage / proxy is interpolated (log-linear in rank) between probed
    levels, constant beyond them."""
    points = sorted((k, probed[k] / tail[k]) for k in probed if tail[k] > 0 and probed[k] > 0)
    out = []
    for k, r in enumerate(ranks):
        if k in probed:
            out.append(probed[k])
        elif tail[k] <= 0 or not points:
            out.append(0.0)
        else:
            xs = [ranks[p] for p, _ in points]
            ys = [np.log(v) for _, v in points]
            out.append(float(np.exp(np.interp(r, xs, ys)) * tail[k]))
    return out


def _fisher_levels(num_levels: int, points: int) -> list[int]:
    """The levels measured to scale a fisher estimate: none for 0 points, the middle one
    for one, else `points` spread from the lowest to the highest cut level."""
    if points == 0:
        return []
    if points >= num_levels - 1:
        return list(range(num_levels - 1))
    if points == 1:
        return [(num_levels - 2) // 2]
    return sorted(set(np.linspace(0, num_levels - 2, points).round().astype(int).tolist()))


def _probe_levels(num_levels: int, config: ProbeConfig) -> list[int]:
    """Which of the non-full levels are measured (full rank is 0 by definition)."""
    if config.mode == "exact" or config.probe_points >= num_levels - 1:
        return list(range(num_levels - 1))
    picks = np.linspace(0, num_levels - 2, config.probe_points).round().astype(int)
    return sorted(set(picks.tolist()))


def _load_partial(path: Path, signature: dict) -> dict[str, list[float]]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    stored = data.get("signature")
    if isinstance(stored, dict) and isinstance(stored.get("config"), dict):
        # a file from before a setting existed (or with it at a value that changes nothing)
        stored = {**stored, "config": without_inert_probe_settings(stored["config"])}
    if stored != signature:
        raise ValueError(f"{path} holds a probe of another model or configuration; delete "
                         "it or choose another cache path")
    return data["rows"]


@torch.no_grad()
def probe(model: nn.Module, teacher: nn.Module, batches: Sequence,
          config: ProbeConfig | None = None, cache_path: str | os.PathLike | None = None,
          use_block_cache: bool = True, progress: bool = True,
          only: Sequence[str] | None = None) -> Sensitivity:
    """Sensitivity matrix of every nested layer of `model` (factorised) against `teacher`
    (the original model) on `batches`.

    With `cache_path`, finished rows are saved after every layer and reused on restart.
    `only` restricts probing to the named layers. Inside a torch.distributed process group
    the measured layers are split across processes and the rows gathered; a fisher
    estimate splits its draws (`fisher_rows`).

    Mutates, and leaves on return: every probed layer (every nested layer, or those named
    in `only`) at its max rank, whatever rank it had before; nested layers outside `only`
    keep their rank, and the probe measures with them at that rank (set them to max rank
    first to probe against the full model); `model` back in the train/eval mode it had
    (it runs in eval mode); `teacher` in eval mode. Batches follow
    `flexrank.compress.calibration.as_batch` (dicts with input_ids, or bare (B, T) id
    tensors, for a language model). Raises ValueError for a model without nested layers,
    an unknown name in `only`, no batches, or a `cache_path` holding a probe of another
    model or configuration; BatchError for a batch in another form.
    """
    config = config or ProbeConfig()
    layers = _layers_to_probe(model, only)
    if not batches:
        raise ValueError("probing needs at least one batch")
    levels, ranks = _candidate_table(layers, config)
    device = next(model.parameters()).device
    batches = [to_device(as_batch(b, model), device) for b in batches]
    masks = [b.get("attention_mask").float() if isinstance(b, Mapping)
             and b.get("attention_mask") is not None else None for b in batches]
    was_training = model.training
    model.eval()
    teacher.eval()
    for layer in layers.values():
        layer.rank = layer.max_rank
    damage = _teacher_damage(teacher, batches, masks, _usable_top_k(model, config))
    blocks = find_blocks(model) if use_block_cache else []
    cache = BlockCache(blocks)
    block_of = _block_of(layers, blocks)

    signature = _signature(layers, ranks, config, masks)
    path = Path(cache_path) if cache_path else None
    rows = _load_partial(path, signature) if path else {}
    rank_id, world = _dist_info()
    todo = [n for i, n in enumerate(layers) if n not in rows and i % world == rank_id]
    probe_levels = _probe_levels(levels, config)
    mode = _resolve_mode(config.mode, damage, layers)
    if mode == ProbeMode.FISHER:
        if not damage.is_lm:
            raise ValueError("fisher probing estimates a language model's token KL; this "
                             f"model's damage is {damage.metric}: use mode='fast'")
        # every process estimates every layer left, from its share of the draws
        pending = _from_rank_zero([n for n in layers if n not in rows])
        estimated = {}
        if pending:  # none left when a resumed probe had finished every row
            with dense_at_max_rank(layers.values()):
                estimated = fisher_rows(model, {n: layers[n] for n in pending},
                                        {n: ranks[n] for n in pending}, batches, masks,
                                        config.fisher_draws, progress=progress,
                                        split=(rank_id, world))
        estimated = {n: [float(max(v, MIN_DAMAGE)) for v in row[:-1]] + [0.0]
                     for n, row in estimated.items()}
        probe_levels = _fisher_levels(levels, config.fisher_points)
        todo = [n for n in todo if n in estimated]  # rank 0's partial file had the others
        if not config.fisher_points:
            rows.update(estimated)
            if path and pending:
                write_json_atomic(path, {"signature": signature, "rows": rows})
            todo = []
    # the layers not being probed (at max rank) run as one dense matmul each, the cached
    # block outputs included
    with dense_at_max_rank(layers.values()):
        if blocks and todo:
            cache.fill(model, batches)
        for name in tqdm(todo, desc=f"probe ({mode})", disable=not progress or not todo,
                         unit="layer"):
            measured = {k: _mean_damage(model, layers[name], ranks[name][k], batches, damage,
                                        cache, block_of[name]) for k in probe_levels}
            if mode == ProbeMode.FISHER:  # the estimate's curve, scaled to the points
                rows[name] = _fill_from_curve(estimated[name], ranks[name],
                                              {**measured, len(ranks[name]) - 1: 0.0})
            else:
                rows[name] = _row(layers[name], ranks[name], measured, config)
            if path:
                write_json_atomic(path, {"signature": signature, "rows": rows})
    rows = _gather_rows(rows, list(layers))
    model.train(was_training)
    shapes = [tuple(layer.U.shape[:1]) + tuple(layer.V.shape[:1]) for layer in layers.values()]
    return Sensitivity(list(layers), shapes, np.array([ranks[n] for n in layers]),
                       np.array([rows[n] for n in layers]),
                       meta={"metric": damage.metric, "probe_levels": probe_levels,
                             **signature["config"], "mode": str(mode),
                             "asked_mode": str(config.mode), "top_k_used": damage.top_k})


def _resolve_mode(mode: ProbeMode, damage: Damage, layers: Mapping[str, nn.Module]) -> ProbeMode:
    """`auto`: fisher for a language model whose nested layers are all linear (what
    fisher_rows estimates), fast otherwise."""
    if mode != ProbeMode.AUTO:
        return mode
    linear = all(isinstance(layer, NestedLinear) for layer in layers.values())
    return ProbeMode.FISHER if damage.is_lm and linear else ProbeMode.FAST


def fisher_rows(model: nn.Module, layers: Mapping[str, nn.Module],
                ranks: Mapping[str, Sequence[int]], batches: Sequence,
                masks: Sequence[torch.Tensor | None], draws: int, seed: int = 0,
                progress: bool = False, split: tuple[int, int] = (0, 1)
                ) -> dict[str, list[float]]:
    """Second-order estimate of each layer's KL(model at max rank ‖ model with that layer
    alone cut to rank r), mean per real token, at each of `ranks[name]`.

    For a layer y = U Vᵀ x (U (m, R), V (n, R)), cutting to rank r changes its output at
    token t by δ_t = −Σ_{j≥r} u_j v_jᵀ x_t. The KL's expansion at δ = 0 is ½ δᵀ F δ with
    F = E_y[g gᵀ], g the gradient of log q(y) (summed over the sequence's real tokens)
    with respect to the layer's outputs, y sampled per token from the model's own
    distribution q (Martens, "New insights and perspectives on the natural gradient
    method", 2020, §9: the Fisher equals the KL's Hessian at its minimum). So
    δᵀ F δ = E_y[s²] with s = Σ_t g_tᵀ δ_t = −Σ_{j≥r} c_j and
    c_j = Σ_t (g_tᵀ u_j)(v_jᵀ x_t): one (m, R) and one (n, R) product per layer and token
    give every rank at once (suffix sums of c). Scores at different tokens are independent
    with mean zero, so the sequence's sum estimates the sum of per-token KLs without bias.
    Each batch's sum is divided by its real tokens and the batches averaged, as the
    measured probe (`_mean_damage`) averages them.

    Draw d of batch i samples its labels from a generator seeded with (seed, i, d), so
    the labels do not depend on which process draws them: with `split` = (rank, world)
    (under torch.distributed) this process takes draws rank, rank + world, … and the
    sums are all-reduced, giving every process every row, equal to one process's to
    float64 summation order.

    Cost: one forward and `draws` backward passes of the whole model per batch (split
    over the processes), however many layers and ranks. Memory: the autograd graph of
    one batch and each layer's x V (tokens × R). Exact for small truncations; a
    quadratic that grows without bound where the true KL bends (BENCHMARKS.md, issue 20,
    compares the plans it gives with the measured probe's). Layers must be
    `NestedLinear`; the model's output must be language-model logits (B, T, V). Raises
    ValueError for another layer type.
    """
    wrong = [n for n, layer in layers.items() if not isinstance(layer, NestedLinear)]
    if wrong:
        raise ValueError(f"fisher probing supports linear layers; {wrong[:3]} are not: "
                         "use mode='fast'")
    names = list(layers)
    damage = {n: torch.zeros(len(ranks[n]), dtype=torch.float64) for n in names}
    rank_id, world = split
    mine = list(range(rank_id, draws, world))
    bar = tqdm(total=len(batches) * len(mine), desc="probe (fisher)", disable=not progress,
               unit="pass")
    for index, (batch, mask) in enumerate(zip(batches, masks, strict=True)):
        if not mine:  # more processes than draws: this one only joins the sum
            break
        logits, inputs, outputs = _forward_keeping(model, layers, batch)
        weight = mask if mask is not None else torch.ones(logits.shape[:2])
        weight = weight.to(logits.device, logits.dtype)
        tokens = max(float(weight.sum()), 1.0)
        squares = {n: torch.zeros(len(ranks[n]), dtype=torch.float64) for n in names}
        with torch.no_grad():
            # float32 at least: a bf16 model's products would round the small terms away
            xv = {n: (inputs[n].float() @ layers[n].V.detach().float()) * weight[..., None]
                  for n in names}  # (B, T, R)
        del inputs
        with torch.enable_grad():
            log_q = F.log_softmax(logits, -1)
        probs = log_q.detach().exp().flatten(0, -2).cpu()  # (B·T, V): the CPU generator's
        for draw in mine:
            state = np.random.SeedSequence([seed, index, draw]).generate_state(1)[0]
            generator = torch.Generator().manual_seed(int(state))
            labels = torch.multinomial(probs, 1, generator=generator)
            labels = labels.to(logits.device).view(*logits.shape[:-1], 1)
            with torch.enable_grad():
                score = (log_q.gather(-1, labels).squeeze(-1) * weight).sum()
            grads = torch.autograd.grad(score, [outputs[n] for n in names],
                                        retain_graph=draw != mine[-1])
            with torch.no_grad():
                for n, g in zip(names, grads, strict=True):
                    gu = g.float() @ layers[n].U.detach().float()  # (B, T, R)
                    c = (gu * xv[n]).sum(1).double()  # (B, R)
                    suffix = c.flip(-1).cumsum(-1).flip(-1)  # Σ_{j≥r} c_j at column r
                    suffix = torch.cat([suffix, suffix.new_zeros(suffix.shape[0], 1)], -1)
                    at = torch.as_tensor(ranks[n])
                    squares[n] += suffix[:, at].square().sum(0).cpu()
            bar.update()
        for n in names:  # this batch's mean per real token, as _mean_damage takes it
            damage[n] += 0.5 * squares[n] / draws / tokens
        del logits, log_q, outputs, xv
    bar.close()
    if world > 1:  # every process's share of the draws, summed in one fixed order
        flat = torch.cat([damage[n] for n in names]) if names else torch.zeros(0)
        flat = flat.to(next(model.parameters()).device)  # NCCL reduces GPU tensors only
        torch.distributed.all_reduce(flat)
        flat = flat.cpu()
        damage = dict(zip(names, flat.split([len(ranks[n]) for n in names]), strict=True))
    return {n: (damage[n] / len(batches)).tolist() for n in names}


def _forward_keeping(model: nn.Module, layers: Mapping[str, nn.Module], batch):
    """(logits, {name: layer input}, {name: layer output}) of one forward with autograd on;
    every output is in the graph, so gradients with respect to each can be taken."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            if not output.requires_grad:  # a leaf: nothing before it requires grad
                output.requires_grad_()
            inputs[name], outputs[name] = args[0].detach(), output
        return hook

    handles = [layer.register_forward_hook(keep(name)) for name, layer in layers.items()]
    try:
        with torch.enable_grad():
            logits = _run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return logits, inputs, outputs


def _layers_to_probe(model: nn.Module, only: Sequence[str] | None) -> dict[str, nn.Module]:
    """{name: nested layer} to probe: all of them, or those named in `only`, in its order."""
    layers = nested_layers(model)
    if not layers:
        raise ValueError("the model has no nested layers: run flexrank.factorize_ first")
    if only is None:
        return layers
    unknown = sorted(set(only) - set(layers))
    if unknown:
        raise ValueError(f"cannot probe {unknown[:3]}: not nested layers of the model")
    return {name: layers[name] for name in only}


def _candidate_table(layers: Mapping[str, nn.Module], config: ProbeConfig,
                     ) -> tuple[int, dict[str, list[int]]]:
    """(levels, {layer: its candidate ranks}): config.num_levels levels, fewer when the
    smallest layer has fewer ranks than that."""
    levels = min(config.num_levels, min(layer.max_rank for layer in layers.values()))
    if levels < config.num_levels:
        logger.warning("smallest layer has rank %d: using %d levels instead of %d",
                       levels, levels, config.num_levels)
    return levels, {name: candidate_ranks(layer.max_rank, levels, config.rank_multiple)
                    for name, layer in layers.items()}


def _usable_top_k(model: nn.Module, config: ProbeConfig) -> int:
    """config.top_k, or 0 (full-vocabulary KL) when the model's output layer is not a
    plain Linear whose rows can be picked (a factorised LM head, no LM head)."""
    top_k = getattr(config, "top_k", 0)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if top_k and callable(get_head) else None
    if top_k and type(head) is not nn.Linear:
        if head is not None:  # no LM head (an encoder, a classifier): top_k does not apply
            logger.info("probe: top_k=%d needs a plain Linear LM head (found %s); using the "
                        "full-vocabulary KL", top_k, type(head).__name__)
        return 0
    return top_k


def _teacher_damage(teacher: nn.Module, batches: Sequence,
                    masks: list[torch.Tensor | None], top_k: int = 0) -> Damage:
    raw = [_forward(teacher, b) for b in batches]
    objective = resolve(Objective.AUTO, raw[0])  # the distillation objective of its kind
    is_lm = objective == Objective.TOKEN_KL
    if not is_lm:  # one value per input: a (B, T) token mask does not apply to class logits
        masks = [m if objective == Objective.FEATURE else None for m in masks]
    return Damage([output_tensor(r, objective).float() if not torch.is_tensor(r) else r.float()
                   for r in raw], is_lm, masks, objective, top_k)


def _signature(layers: Mapping[str, nn.Module], ranks: dict[str, list[int]],
               config: ProbeConfig, masks: list[torch.Tensor | None]) -> dict:
    """What a saved partial probe must match to be reused (see `_load_partial`)."""
    tokens = int(sum(m.sum() if m is not None else 0 for m in masks))
    return {"layers": list(layers), "ranks": [ranks[n] for n in layers],
            "config": without_inert_probe_settings(config.to_dict()), "tokens": tokens}


def _mean_damage(model: nn.Module, layer: nn.Module, rank: int, batches: Sequence,
                 damage: Damage, cache: BlockCache, first_block: int) -> float:
    """Mean damage over `batches` with `layer` alone cut to `rank` (restored to max rank
    afterwards); the blocks before `first_block` replay their cached outputs."""
    layer.rank = rank
    total = 0.0
    for i, batch in enumerate(batches):
        with cache.skip_before(i, first_block), damage.head_for(model, i):
            total += damage(i, _run(model, batch))
    layer.rank = layer.max_rank
    return total / len(batches)


def _row(layer: nn.Module, ranks: list[int], measured: dict[int, float],
         config: ProbeConfig) -> list[float]:
    """The layer's damage at every level from its measured ones (full rank: 0)."""
    measured = {**measured, len(ranks) - 1: 0.0}
    if config.mode == "exact":
        return [measured[k] for k in range(len(ranks))]
    sigma = layer.U.detach().double().square().sum(0)  # U = P√σ: ‖U_j‖² = σ_j
    return _fill_from_tail(sigma, ranks, measured)


def _dist_info() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank_zero(value):
    """`value` as process 0 has it (under torch.distributed; else unchanged): what every
    process must agree on before a collective, whatever partial file each one read."""
    _, world = _dist_info()
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather_rows(rows: dict[str, list[float]], names: list[str]) -> dict[str, list[float]]:
    rank_id, world = _dist_info()
    if world == 1:
        return rows
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, rows)
    merged = {}
    for part in gathered:
        merged.update(part)
    missing = [n for n in names if n not in merged]
    if missing:
        raise RuntimeError(f"probe rows missing after gathering: {missing[:3]}")
    return merged
