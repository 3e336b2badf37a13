"""A depth-elastic checkpoint (JointPlan, issue 18) saves and loads back: a model rebuilt
from the folder alone gives the saved model's logits at every budget, bit for bit; the
safetensors file (read with safetensors' own reader) holds each donor weight once and the
stand-ins' own tensors, counted by hand from the tiny Llama's dimensions; a damaged joint
plan gives the clear error."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from test_depth import logits
from test_depth_elastic import elastic_setup  # noqa: F401  (the module-scoped fixture)

from flexrank.compress.config import DistillConfig
from flexrank.compress.depth import DepthSwitch, SharedLinear, make_depth_elastic_
from flexrank.compress.distill import distill
from flexrank.compress.elastic import PLAN_FILE, WEIGHTS_FILE, ElasticModel
from flexrank.planning.depth import JointPlan

# test_depth.llama's dimensions, written out (not read from our modules)
HIDDEN, INTERMEDIATE, KV = 32, 64, 2 * (32 // 4)  # KV: key-value heads x head dim
LINEAR_SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN),
                 "self_attn.v_proj": (KV, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
                 "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
                 "mlp.down_proj": (HIDDEN, INTERMEDIATE)}


@pytest.fixture(scope="module")
def saved(elastic_setup, tmp_path_factory):  # noqa: F811
    """A depth-elastic tiny Llama after 2 distillation steps, and its saved folder."""
    teacher, factorised, batches, stats, plan = elastic_setup
    model = copy.deepcopy(factorised)
    make_depth_elastic_(model, plan, stats)
    distill(model, teacher, plan, batches[:4],
            DistillConfig(steps=2, lr=1e-2, warmup_steps=0, batch_size=4,
                          checkpoint_every=0), progress=False)
    model.eval()
    elastic = ElasticModel(model, plan, model_id="tiny-depth")
    path = elastic.save_pretrained(tmp_path_factory.mktemp("depth") / "checkpoint")
    return elastic, path, batches, factorised


def test_joint_plan_checkpoint_loads_back_equal_at_every_budget(saved):
    elastic, path, batches, _ = saved
    assert json.loads((path / PLAN_FILE).read_text())["format"] == "flexrank-joint-plan"
    loaded = ElasticModel.from_pretrained(path)  # a fresh LlamaForCausalLM from config.json
    assert isinstance(loaded.plan, JointPlan) and loaded.plan == elastic.plan
    plan = elastic.plan
    assert any(plan.replaced_for(b) for b in plan.budgets)  # else nothing is tested
    for beta in plan.budgets:
        elastic.set_budget(beta)
        loaded.set_budget(beta)
        switched = {f"model.layers.{i}" for i, block in enumerate(loaded.model.model.layers)
                    if isinstance(block, DepthSwitch) and block.replaced}
        assert switched == set(plan.replaced_for(beta))
        for a, b in zip(logits(loaded.model, batches[4:6]), logits(elastic.model, batches[4:6]),
                        strict=True):
            assert torch.equal(a, b), (beta, float((a - b).abs().max()))
    # the stand-ins' donors are the loaded model's donor layers themselves (by reference)
    for stand_in, (donor, _rank) in plan.replaced_for(plan.budgets[0]).items():
        switch = loaded.model.get_submodule(stand_in)
        for rel in LINEAR_SHAPES:
            shared = switch.depth_stand_in.get_submodule(rel)
            assert isinstance(shared, SharedLinear)
            assert shared.donor is loaded.model.get_submodule(f"{donor}.{rel}")


def test_donor_weights_are_stored_once(saved):
    from safetensors import safe_open

    elastic, path, _, factorised = saved
    plan = elastic.plan
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert not [k for k in shapes if ".donor." in k]
    top = {j: max(row[j] for row in plan.adapter_ranks) for j in range(len(plan.blocks))}
    stand_in_numel = 0
    for j, rank in top.items():
        if not rank:
            assert not [k for k in shapes if k.startswith(f"{plan.blocks[j]}.depth_stand_in.")]
            continue
        prefix = f"{plan.blocks[j]}.depth_stand_in."
        expected = {}
        for rel, (m, n) in LINEAR_SHAPES.items():  # U (m, a), V (n, a), scale (m,); no bias
            a = min(rank, m, n)
            expected |= {f"{prefix}{rel}.U": (m, a), f"{prefix}{rel}.V": (n, a),
                         f"{prefix}{rel}.scale": (m,)}
        expected |= {f"{prefix}input_layernorm.weight": (HIDDEN,),
                     f"{prefix}post_attention_layernorm.weight": (HIDDEN,)}
        got = {k: s for k, s in shapes.items() if k.startswith(prefix)}
        assert got == expected
        stand_in_numel += sum(torch.Size(s).numel() for s in expected.values())
    # everything else: the factorised model's own tensors, once (tied embeddings once)
    own = {id(p): p.numel() for p in factorised.parameters()}
    assert sum(torch.Size(s).numel() for s in shapes.values()) == sum(own.values()) + stand_in_numel


@pytest.mark.parametrize("damage", ["truncated", "missing field", "other model's blocks",
                                    "unknown format"])
def test_damaged_joint_plan_gives_the_clear_error(saved, tmp_path, damage):
    _, path, _, _ = saved
    folder = tmp_path / "checkpoint"
    shutil.copytree(path, folder)
    plan_path = folder / PLAN_FILE
    text = plan_path.read_text()
    data = json.loads(text)
    if damage == "truncated":
        plan_path.write_text(text[: len(text) // 2])
    elif damage == "missing field":
        del data["donors"]
        plan_path.write_text(json.dumps(data))
    elif damage == "other model's blocks":
        data["blocks"] = [b.replace("model.layers", "transformer.h") for b in data["blocks"]]
        plan_path.write_text(json.dumps(data))
    else:
        data["format"] = "flexrank-joint-plan-v9"
        plan_path.write_text(json.dumps(data))
    match = ("does not fit the checkpoint's model" if damage == "other model's blocks"
             else "is damaged or was edited by hand")
    with pytest.raises(ValueError, match=match) as err:
        ElasticModel.from_pretrained(folder)
    assert str(plan_path) in str(err.value) and "re-create the checkpoint" in str(err.value)
