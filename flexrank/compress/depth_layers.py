"""The depth axis's modules (issue 18): `SharedLinear` (a donor layer held by reference plus
a low-rank adapter and an output scale), `DepthSwitch` (a block that runs itself or its
stand-in) and the walks over them. Apart from `flexrank.compress.depth` (the probe and the
stand-ins' construction), which imports calibration, so that ElasticModel, distillation and
the exporters can use these without an import cycle. See depth.py's docstring for the
method (FlexiGPT, Smith et al., NAACL 2025, arXiv:2501.14713).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flexrank.compress.layers import NESTED_TYPES, NestedLinear, _NestedFactors, linear_weight
from flexrank.compress.select import is_factorizable
from flexrank.compress.surgery import swap_modules_


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, the ModuleList of repeated blocks): the ModuleList of more than one
    module holding the most linear layers. Raises ValueError when the model has none."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            count = sum(_is_linear(m) for m in module.modules())
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks holding "
                         "linear layers: the depth axis needs a stack of blocks")
    return best


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return False
    return isinstance(module, (NestedLinear, SharedLinear)) or is_factorizable(module)


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """{name relative to the block: layer} of its linear layers (Linear, GPT-2 Conv1D,
    NestedLinear), in order. Raises ValueError for a block with convolutions."""
    out = {}
    for name, module in block.named_modules():
        nested_conv = isinstance(module, NESTED_TYPES) and not isinstance(module, NestedLinear)
        if nested_conv or isinstance(module, (nn.Conv1d, nn.Conv2d)):
            raise ValueError(f"block layer {name} is a convolution: stand-ins are built for "
                             "linear layers only")
        if _is_linear(module) and name:
            out[name] = module
    return out


def dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W (out, in), bias) that `module` computes: full rank for a NestedLinear."""
    if isinstance(module, NestedLinear):
        bias = module.bias.detach() if module.bias is not None else None
        return module.dense_weight(module.max_rank).detach(), bias
    if isinstance(module, SharedLinear):
        bias = module.bias.detach() if module.bias is not None else None
        return module.weight.detach(), bias
    return linear_weight(module)


class SharedLinear(_NestedFactors):
    """y = scale ⊙ (donor(x) + U_r V_rᵀ x) + bias, the donor held by reference.

    U (out, R), V (in, R): the adapter, `rank` r in [1, R] settable at run time; scale
    (out,): the output normalisation; bias (out,) or None: b − scale ⊙ b_donor (b: the
    pruned layer's bias), so that the output's bias is b. Shapes of x and y as nn.Linear:
    (..., in) -> (..., out). The scale is fitted at one adapter rank (`build_stand_in`'s
    init_rank) and kept at the others.
    """

    def __init__(self, donor: nn.Module, max_rank: int, bias: bool, donor_name: str = ""):
        weight, _ = dense_weight(donor)
        m, n = weight.shape
        super().__init__(m, n, max_rank, bias, weight.device, weight.dtype)
        self.in_features, self.out_features = n, m
        self.scale = nn.Parameter(torch.ones(m, device=weight.device, dtype=weight.dtype))
        # not a registered submodule: the donor's weights live (and are saved) once, in
        # the donor block; object.__setattr__ bypasses nn.Module's registration
        object.__setattr__(self, "donor", donor)
        self.donor_name = donor_name  # qualified, for `relink_donors_` after a module swap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._rank
        # s ⊙ (donor(x) + U Vᵀ x) with s applied to the donor's output and to U's rows,
        # so that the last op is an Add: onnxruntime's QuickGelu fusion takes any Mul
        # feeding a Sigmoid (SiLU) for its scalar pattern and fails on a vector
        adapter = F.linear(F.linear(x, self.V[:, :r].T), self.U[:, :r] * self.scale[:, None],
                           self.bias)
        return self.donor(x) * self.scale + adapter  # (..., out)

    @property
    def weight(self) -> torch.Tensor:
        """The effective dense weight at the active ranks (bias apart), (out, in)."""
        donor, _ = linear_weight(self.donor)  # a NestedLinear donor: at its active rank
        return self.scale[:, None] * (donor + self.dense_weight())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, donor={type(self.donor).__name__}"


class DepthSwitch(nn.Module):
    """A block that runs either itself or its stand-in (`replaced`), for the elastic model.

    The block's children (and own parameters) are registered here under their own names,
    so every layer keeps its qualified name ("model.layers.3.self_attn.q_proj") and the
    plan's rank table still finds it; the stand-in is the child `depth_stand_in`. The block
    object itself is held by reference and runs its own forward on those same children.
    Other attributes (e.g. `attention_type`, read by some models' loops) come from it.
    """

    def __init__(self, block: nn.Module, stand_in: nn.Module):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, param in block.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in block.named_buffers(recurse=False):
            self.register_buffer(name, buffer,
                                 persistent=name not in block._non_persistent_buffers_set)
        object.__setattr__(self, "block", block)
        self.depth_stand_in = stand_in
        self.replaced = False

    def forward(self, *args, **kwargs):
        return (self.depth_stand_in if self.replaced else self.block)(*args, **kwargs)

    def train(self, mode: bool = True) -> DepthSwitch:
        super().train(mode)
        self.block.train(mode)  # not a registered child: its own flag follows by hand
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("block")  # absent while __init__ registers children
            if block is None:
                raise
            return getattr(block, name)


def _copy_without_linears(block: nn.Module, linears: dict[str, nn.Module]) -> nn.Module:
    """deepcopy(block), its linear layers copied as nn.Identity placeholders (no copy of
    their weights: they are swapped for SharedLinears right after)."""
    memo = {id(layer): nn.Identity() for layer in linears.values()}
    return copy.deepcopy(block, memo)


@torch.no_grad()
def stand_in_skeleton(block: nn.Module, donor_block: nn.Module, max_rank: int,
                      block_name: str = "", donor_name: str = "") -> nn.Module:
    """The structure of `block`'s stand-in, without data: a copy of `block` (its norms,
    attention settings, KV-cache slot) whose linears are SharedLinears over `donor_block`'s
    layers of the same relative names, each with an adapter of rank min(max_rank, m, n)
    (U, V zero), scale 1 and a bias (zero) when the block's or the donor's layer has one.

    `flexrank.compress.depth.build_stand_in` fills the values from calibration data;
    `ElasticModel.from_pretrained` loads them from a checkpoint. `block_name` names the
    block in errors; `donor_name` (the donor block's qualified name) is recorded for
    `relink_donors_`. Raises ValueError when the blocks' linear layers differ in names
    or shapes, or for max_rank < 1.
    """
    if max_rank < 1:
        raise ValueError(f"block {block_name}: adapter rank {max_rank} must be >= 1")
    own, donors = block_linears(block), block_linears(donor_block)
    if list(own) != list(donors):
        raise ValueError(f"block {block_name}'s linears {list(own)[:3]}... differ from its "
                         f"donor's {list(donors)[:3]}...: a donor must have the same layers")
    replacements = {}
    for rel, layer in own.items():
        W, bias = dense_weight(layer)
        Wd, donor_bias = dense_weight(donors[rel])
        if W.shape != Wd.shape:
            raise ValueError(f"{block_name}.{rel} is {tuple(W.shape)} but its donor is "
                             f"{tuple(Wd.shape)}: a donor must have the same shapes")
        new = SharedLinear(donors[rel], min(max_rank, *W.shape),
                           bias is not None or donor_bias is not None,
                           f"{donor_name}.{rel}" if donor_name else "")
        new.U.zero_()
        new.V.zero_()
        new.train(layer.training)
        replacements[rel] = new
    copy_of = _copy_without_linears(block, own)
    swap_modules_(copy_of, lambda name, _m: replacements.get(name))
    return copy_of


def depth_switches_(model: nn.Module, plan, build=None) -> dict[int, DepthSwitch]:
    """In place: every block that `plan` (a JointPlan) replaces at some budget becomes a
    DepthSwitch over a stand-in whose adapters have the largest rank the plan gives it.

    `build(j, donor, rank, names)` makes block j's stand-in (names: the blocks' qualified
    names); None: `stand_in_skeleton` (no data, values to load). Returns {block index:
    switch}. Raises ValueError when the plan's blocks are not the model's, or when a block
    to switch already is a DepthSwitch (pass a model that is not depth-elastic yet).
    """
    prefix, blocks = block_list(model)
    names = [f"{prefix}.{i}" if prefix else str(i) for i in range(len(blocks))]
    if list(plan.blocks) != names:
        raise ValueError(f"the plan's blocks {list(plan.blocks)[:3]}... ({len(plan.blocks)}) "
                         f"are not the model's {names[:3]}... ({len(names)}): plan and model "
                         "do not match")
    top = [max(int(row[j]) for row in plan.adapter_ranks) for j in range(len(blocks))]
    switches = {}
    for j, rank in enumerate(top):
        if rank <= 0:
            continue
        if isinstance(blocks[j], DepthSwitch):
            raise ValueError(f"block {names[j]} already is a DepthSwitch: pass a model that "
                             "is not depth-elastic yet")
        donor = int(plan.donors[j])
        if build is None:
            stand_in = stand_in_skeleton(blocks[j], blocks[donor], rank, names[j],
                                         names[donor])
        else:
            stand_in = build(j, donor, rank, names)
        switches[j] = DepthSwitch(blocks[j], stand_in)
    for j, switch in switches.items():  # all built first: donors are the blocks as they were
        blocks[j] = switch
    return switches


def relink_donors_(model: nn.Module) -> int:
    """Point every SharedLinear of `model` at the module now registered under its donor's
    name (after a swap replaced the donor layer, e.g. by its deployment form, so that the
    donor's weights stay shared). Returns how many were relinked. Raises ValueError for a
    donor name the model lacks."""
    count = 0
    for module in model.modules():
        if isinstance(module, SharedLinear) and module.donor_name:
            try:
                donor = model.get_submodule(module.donor_name)
            except AttributeError as err:
                raise ValueError(f"a stand-in's donor {module.donor_name} is not in the "
                                 "model: was the donor block replaced?") from err
            object.__setattr__(module, "donor", donor)
            count += 1
    return count


def set_adapter_rank_(stand_in: nn.Module, rank: int) -> None:
    """Every SharedLinear of `stand_in` at min(rank, its max rank)."""
    for module in stand_in.modules():
        if isinstance(module, SharedLinear):
            module.rank = min(rank, module.max_rank)


def apply_depth_(model: nn.Module, plan, beta: float) -> dict[str, int]:
    """Set every DepthSwitch of `model` to `plan`'s choice at `beta` (replaced, adapter
    rank); returns {block: adapter rank} of the replaced ones. A model without switches is
    left alone. Raises ValueError for a plan that replaces a block the model cannot switch."""
    prefix, blocks = block_list(model)
    row = plan.adapter_ranks[plan.budget_index(beta)]
    replaced = {}
    for j, rank in enumerate(row):
        switch = blocks[j]
        if not isinstance(switch, DepthSwitch):
            if rank:
                raise ValueError(f"the plan replaces block {plan.blocks[j]} at β={beta} but "
                                 "the model has no stand-in for it: run make_depth_elastic_")
            continue
        switch.replaced = bool(rank)
        if rank:
            set_adapter_rank_(switch.depth_stand_in, int(rank))
            replaced[plan.blocks[j]] = int(rank)
    return replaced


def stand_in_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{qualified name: parameter} of every stand-in's own weights (adapters, scales, bias
    deltas, norms): what distillation trains besides the nested layers."""
    return {f"{name}.depth_stand_in.{p_name}": p for name, m in model.named_modules()
            if isinstance(m, DepthSwitch)
            for p_name, p in m.depth_stand_in.named_parameters()}


@dataclass(frozen=True)
class StandInLayer:
    """One SharedLinear of a stand-in as a budget deploys it (for the export manifest).

    name: qualified ("model.layers.2.depth_stand_in.mlp.up_proj"); shape: (out m, in n);
    rank: the adapter rank a at the budget; params: the numbers the budget stores for it,
    a·(m + n) (U_a, V_a) + m (the output scale), bias excluded; the donor's weights are
    not counted: they are stored once, in the donor block.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    params: int


@dataclass(frozen=True)
class DepthDeployment:
    """What a joint plan's budget deploys of the depth axis (`deployed_depth`).

    replaced: qualified names of the replaced blocks (their own layers are not deployed);
    stand_in_layers: the active stand-ins' SharedLinears; idle: ids of the parameters the
    budget does not run, besides a replaced block's nested layers (the replaced blocks'
    own norms and other weights, the stand-ins of kept blocks), plus the active stand-ins'
    SharedLinear parameters (counted in `stand_in_layers`, not among the other weights).
    """

    replaced: frozenset[str]
    stand_in_layers: tuple[StandInLayer, ...]
    idle: frozenset[int]

    def deploys(self, layer_name: str) -> bool:
        """Whether a nested layer of this name is deployed (not in a replaced block)."""
        return not any(layer_name.startswith(block + ".") for block in self.replaced)


def deployed_depth(model: nn.Module, plan, beta: float) -> DepthDeployment | None:
    """The depth part of budget `beta` of `model` under `plan`: None for a plan without
    a depth axis (a NestedPlan) or a model without DepthSwitches. Reads the plan, not the
    switches' current state. Raises ValueError (apply_depth_'s) when the plan replaces a
    block that has no stand-in, or for a budget the plan lacks."""
    if not hasattr(plan, "adapter_ranks"):
        return None
    prefix, blocks = block_list(model)
    if not any(isinstance(block, DepthSwitch) for block in blocks):
        return None
    row = plan.adapter_ranks[plan.budget_index(beta)]
    replaced, layers, idle = set(), [], set()
    for j, switch in enumerate(blocks):
        if not isinstance(switch, DepthSwitch):
            if row[j]:
                raise ValueError(f"the plan replaces block {plan.blocks[j]} at β={beta} but "
                                 "the model has no stand-in for it: run make_depth_elastic_")
            continue
        stand_in = {id(p) for p in switch.depth_stand_in.parameters()}
        if not row[j]:
            idle |= stand_in
            continue
        name = f"{prefix}.{j}" if prefix else str(j)
        replaced.add(name)
        idle |= {id(p) for p in switch.parameters()} - stand_in
        for rel, module in switch.depth_stand_in.named_modules():
            if isinstance(module, SharedLinear):
                m, n = module.out_features, module.in_features
                a = min(int(row[j]), module.max_rank)
                layers.append(StandInLayer(f"{name}.depth_stand_in.{rel}", (m, n), a,
                                           a * (m + n) + m))
                idle |= {id(p) for p in module.parameters()}
    return DepthDeployment(frozenset(replaced), tuple(layers), frozenset(idle))


@contextmanager
def depth_at(model: nn.Module, plan, beta: float):
    """`model` with its DepthSwitches as `plan` has them at `beta` (`apply_depth_`); their
    previous states (replaced, adapter ranks) are restored afterwards. Does nothing for a
    plan without a depth axis (a NestedPlan) or a model without switches. For code that
    sets ranks by hand (an exporter at rounded ranks, a copy of the model to deploy): the
    ranks alone do not say which blocks a budget replaces."""
    if not hasattr(plan, "adapter_ranks"):
        yield model
        return
    switches = [m for m in model.modules() if isinstance(m, DepthSwitch)]
    shared = [m for s in switches for m in s.depth_stand_in.modules()
              if isinstance(m, SharedLinear)]
    previous = [s.replaced for s in switches], [m.rank for m in shared]
    if switches:
        apply_depth_(model, plan, beta)
    try:
        yield model
    finally:
        for switch, replaced in zip(switches, previous[0], strict=True):
            switch.replaced = replaced
        for module, rank in zip(shared, previous[1], strict=True):
            module.rank = rank
