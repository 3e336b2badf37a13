"""The elastic model under a joint plan: each budget switches blocks between the original
and the stand-in with the planned ranks (equal to a model built for that budget alone by
surgery), layer names unchanged, and nested distillation trains the stand-ins."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import token_batches
from test_depth import llama, logits

from flexrank.compress.config import DistillConfig, ProbeConfig
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.depth import (
    DepthConfig,
    DepthSwitch,
    make_depth_elastic_,
    probe_depth,
    replace_blocks_,
    stand_in_parameters,
)
from flexrank.compress.distill import distill
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.probe import probe
from flexrank.compress.select import nested_layers
from flexrank.compress.surgery import factorize_
from flexrank.planning.depth import joint_plan


@pytest.fixture(scope="module")
def elastic_setup():
    teacher = llama(seed=3)
    model = copy.deepcopy(teacher)
    batches = token_batches(100, num=12, batch=4, seq=16, seed=3)
    stats = collect_covariances(model, batches, progress=False)
    factorize_(model, stats, progress=False)
    depth = probe_depth(model, batches[:2], stats,
                        DepthConfig(max_replaced=0.5, adapter_ranks=(2, 4, 8), donor_window=2),
                        progress=False)
    sens = probe(model, teacher, batches[:2], ProbeConfig(mode="exact", num_levels=4),
                 progress=False)
    plan = joint_plan(sens, depth, budgets=[0.45, 0.6, 0.8, 1.0])
    return teacher, model, batches, stats, plan


def test_switching_equals_a_model_built_for_the_budget(elastic_setup):
    _, factorised, batches, stats, plan = elastic_setup
    assert any(plan.replaced_for(b) for b in plan.budgets), plan.adapter_ranks
    model = copy.deepcopy(factorised)
    names = list(nested_layers(model))
    switches = make_depth_elastic_(model, plan, stats)
    assert switches and list(nested_layers(model)) == names
    elastic = ElasticModel(model, plan)
    for beta in plan.budgets:
        elastic.set_budget(beta)
        built = copy.deepcopy(factorised)
        for name, rank in plan.ranks_for(beta).items():
            nested_layers(built)[name].rank = rank
        index = {b: i for i, b in enumerate(plan.blocks)}
        replace_blocks_(built, {index[b]: (index[d], a)
                                for b, (d, a) in plan.replaced_for(beta).items()}, stats)
        for a, b in zip(logits(model, batches[:2]), logits(built, batches[:2]), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        replaced = {plan.blocks[j] for j, s in switches.items() if s.replaced}
        assert replaced == set(plan.replaced_for(beta))


def test_distillation_trains_the_stand_ins(elastic_setup):
    teacher, factorised, batches, stats, plan = elastic_setup
    model = copy.deepcopy(factorised)
    make_depth_elastic_(model, plan, stats)
    before = {k: v.detach().clone() for k, v in stand_in_parameters(model).items()}
    assert any(".U" in k for k in before) and any("layernorm" in k for k in before)
    smallest = plan.budgets[0]
    held_out = token_batches(100, num=2, batch=4, seq=16, seed=99)

    def held_out_kl():
        ElasticModel(model, plan).set_budget(smallest)
        pairs = zip(logits(teacher, held_out), logits(model, held_out), strict=True)
        return sum(float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                                  reduction="none").sum(-1).mean()) for t, s in pairs)

    kl_before = held_out_kl()
    distill(model, teacher, plan, batches, DistillConfig(steps=40, lr=3e-3, warmup_steps=2,
                                                         batch_size=8), progress=False)
    after = stand_in_parameters(model)
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k].detach())]
    assert any(".U" in k for k in changed) and any(".scale" in k for k in changed)
    assert held_out_kl() < 0.9 * kl_before
    assert isinstance(model.model.layers[int(changed[0].split(".")[2])], DepthSwitch)


def test_switched_model_saves_each_weight_once_and_reloads(elastic_setup, tmp_path):
    """safetensors' save_model/load_model (what ElasticModel.save_pretrained uses): the
    stand-ins' weights under their own names, donors' once; a fresh model given the same
    switches (no covariances: the values come from the file) computes the same logits."""
    from safetensors import safe_open
    from safetensors.torch import load_model, save_model

    _, factorised, batches, stats, plan = elastic_setup
    model = copy.deepcopy(factorised)
    make_depth_elastic_(model, plan, stats)
    save_model(model, str(tmp_path / "w.safetensors"))
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        keys = set(f.keys())
    assert any("depth_stand_in" in k and k.endswith(".U") for k in keys)
    assert not any(".donor." in k for k in keys)
    stored = sum(_numels(tmp_path / "w.safetensors"))
    unique = {id(p): p.numel() for p in model.parameters()}
    assert stored == sum(unique.values())
    fresh = copy.deepcopy(factorised)
    make_depth_elastic_(fresh, plan, None)
    load_model(fresh, str(tmp_path / "w.safetensors"))
    beta = plan.budgets[0]
    ElasticModel(model, plan).set_budget(beta)
    ElasticModel(fresh, plan).set_budget(beta)
    for a, b in zip(logits(fresh, batches[:1]), logits(model, batches[:1]), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _numels(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return [int(torch.Size(f.get_slice(k).get_shape()).numel())
                for k in f.keys()]  # noqa: SIM118  (safe_open is not iterable)
