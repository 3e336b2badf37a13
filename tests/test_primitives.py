"""One home per primitive (DESIGN.md §2): the deployed cost r(m+n−r), the budget-matching
rule, the module-swap walk, the cache folder, the model kind, and the shared format names.

Each is checked against a reference outside it: stored parameter counts of real deployed
modules, hand-computed budgets and paths, PyTorch outputs, and the source itself (each
constant defined in exactly one module)."""

from __future__ import annotations

import ast
import json
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import char_tokenizer, tiny_bert, tiny_cnn, tiny_gpt2, tiny_llama, token_batches
from elastic_fixtures import nested_plan
from torch import nn

from flexrank.budget import BUDGET_TOLERANCE, match_budget, same_budget
from flexrank.cli.export import _default_work_dir
from flexrank.compress import models
from flexrank.compress.budget_cost import budget_cost
from flexrank.compress.config import FactorizeConfig
from flexrank.compress.elastic import BudgetError, ElasticModel, restructure_
from flexrank.compress.models import model_kind
from flexrank.compress.pipeline import fast_compress_config
from flexrank.compress.select import nested_layers
from flexrank.compress.surgery import factorize_, swap_modules_
from flexrank.device import host as host_module
from flexrank.exporters import resolve_budgets
from flexrank.exporters.common.forms import (
    DenseLinear,
    FactorLinear,
    FormPolicy,
    GaugeLinear,
    deploy_layer,
    deployable_model,
)
from flexrank.exporters.executorch.quant import linear_forms_
from flexrank.io import cache_dir
from flexrank.planning.costs import gauge_fixed_params, plain_params
from flexrank.planning.planner import plan
from flexrank.planning.sensitivity import Sensitivity

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [path for folder in ("flexrank", "exporters", "runtime")
           for path in (ROOT / folder).rglob("*.py")]


def two_layer_sensitivity() -> Sensitivity:
    """Two layers, ranks 1, 3 and full, errors falling to 0 at full rank."""
    return Sensitivity(["a", "b"], [(8, 6), (6, 8)], np.array([[1, 3, 6], [1, 3, 6]]),
                       np.array([[3.0, 1.0, 0.0], [2.0, 1.5, 0.0]]))


def factorised(model: nn.Module) -> nn.Module:
    factorize_(model, config=FactorizeConfig(method="plain"), progress=False)
    return model


# --- the deployed cost ---------------------------------------------------------------------

def stored_numbers(module: nn.Module) -> int:
    """What a deployed layer really stores, bias excluded."""
    return sum(p.numel() for name, p in module.named_parameters() if not name.endswith("bias"))


@pytest.mark.parametrize("m, n", [(8, 6), (6, 8), (12, 12), (20, 5)])
def test_costs_equal_the_numbers_each_deployed_form_stores(m, n):
    torch.manual_seed(0)
    layer = factorised(nn.Sequential(nn.Linear(n, m)))[0]
    for rank in range(1, min(m, n) + 1):
        # (m - r)(n - r) numbers of the dense matrix are not stored: the identity used below
        assert gauge_fixed_params(m, n, rank) == m * n - (m - rank) * (n - rank)
        assert plain_params(m, n, rank) == m * rank + n * rank
        for form in ("gauge", "plain", "dense"):
            module, record = deploy_layer("l", layer, rank, policy=FormPolicy(force_form=form))
            assert record.params == stored_numbers(module), (form, rank, record)
        module, record = deploy_layer("l", layer, rank, factors_only=True)
        assert record.params == stored_numbers(module) == plain_params(m, n, rank)
    assert gauge_fixed_params(m, n, min(m, n)) == m * n  # full rank is dense
    with pytest.raises(ValueError, match=rf"rank {min(m, n) + 1} is out of range"):
        gauge_fixed_params(m, n, min(m, n) + 1)


# --- the budget-matching rule --------------------------------------------------------------

def test_same_budget_absorbs_float_noise_only():
    assert 0.1 * 6 != 0.6 and same_budget(0.1 * 6, 0.6)  # 0.6000000000000001
    assert same_budget(0.6, 0.6 + BUDGET_TOLERANCE / 2)
    assert not same_budget(0.6, 0.6 + 10 * BUDGET_TOLERANCE)
    assert not same_budget(0.6, 0.6 + 1e-6)  # the smallest step a user would type


def test_match_budget_returns_the_stored_budget_or_lists_them():
    assert match_budget(0.1 * 6, [1.0, 0.6]) == 0.6

    class Custom(ValueError):
        pass

    with pytest.raises(Custom) as caught:
        match_budget(0.7, (0.6, 1.0), error=Custom)
    assert str(caught.value) == ("budget 0.7 is not one of the plan's budgets [0.6, 1.0]: "
                                 "choose one of them")


QUERIES = [(0.1 * 6, True), (0.6 + 1e-10, True), (0.6 + 1e-8, False), (0.7, False)]


def test_plan_checkpoint_and_exporter_match_budgets_alike():
    """Hand-decided answers: float noise matches 0.6, a real difference does not."""
    nested = plan(two_layer_sensitivity(), budgets=[0.6, 1.0])
    model = factorised(tiny_llama())
    elastic = ElasticModel(model, nested_plan(model, (0.6, 1.0)))
    for beta, matches in QUERIES:
        if matches:
            assert nested.ranks_for(beta) == nested.ranks_for(0.6)
            assert elastic.layer_ranks(beta) == elastic.plan.ranks_for(0.6)
            assert resolve_budgets(elastic, [beta, 1.0]) == [0.6, 1.0]
            continue
        with pytest.raises(ValueError, match=f"budget {beta} is not in this plan"):
            nested.ranks_for(beta)
        with pytest.raises(BudgetError, match=f"budget {beta} is not one of the plan's"):
            elastic.set_budget(beta)
        with pytest.raises(ValueError, match=f"budget {beta} is not one of the plan's"):
            resolve_budgets(elastic, [beta])


def test_planner_refuses_budgets_that_match_each_other():
    with pytest.raises(ValueError, match="is given twice"):
        plan(two_layer_sensitivity(), budgets=[0.6, 0.6 + 1e-10, 1.0])
    assert plan(two_layer_sensitivity(), budgets=[0.6, 0.6 + 1e-6, 1.0]).budgets[:2] == (
        0.6, 0.6 + 1e-6)


# --- the module-swap walk ------------------------------------------------------------------

def small_tree() -> nn.Module:
    return nn.Sequential(OrderedDict(
        a=nn.Linear(2, 2),
        b=nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 3))),
        c=nn.ReLU()))


def test_swap_walk_offers_every_submodule_in_named_modules_order():
    model, seen = small_tree(), []
    assert swap_modules_(model, lambda name, module: seen.append((name, module))) is model
    assert seen == list(model.named_modules())[1:]  # all but the root, same objects


def test_swap_walk_sets_replacements_on_their_parent_and_skips_inside_them():
    model, seen = small_tree(), []
    old_b = model.b

    def replace(name, module):
        seen.append(name)
        if name == "b.1.1":
            return nn.Identity()
        return nn.Tanh() if name == "c" else None

    swap_modules_(model, replace)
    assert seen == ["a", "b", "b.0", "b.1", "b.1.0", "b.1.1", "c"]
    assert model.b is old_b and isinstance(model.b[1][1], nn.Identity)
    assert isinstance(model.c, nn.Tanh)
    seen.clear()
    swap_modules_(model, lambda name, module: seen.append(name) or
                  (nn.Identity() if name == "b" else None))
    assert "b.0" not in seen and isinstance(model.b, nn.Identity)  # not walked into


def test_factorize_refuses_a_bare_layer_and_restructure_names_missing_layers():
    with pytest.raises(ValueError, match="the model is itself a Linear"):
        factorize_(nn.Linear(6, 4), config=FactorizeConfig(method="plain"), progress=False)
    spec = {"kind": "NestedLinear", "in_features": 2, "out_features": 2, "max_rank": 2,
            "bias": True}
    with pytest.raises(ValueError, match=r"1 layers .*\['z.0'\]"):
        restructure_(small_tree(), {"a": spec, "z.0": spec})


def test_deployed_forms_and_their_linear_version_compute_the_nested_model():
    """deployable_model and linear_forms_ (both through the one walk) against the nested
    PyTorch model at the same ranks."""
    model = factorised(tiny_llama(init_std=0.2))
    layers = nested_layers(model)
    ranks = {name: max(1, layer.max_rank // 2) for name, layer in layers.items()}
    for name, rank in ranks.items():
        layers[name].rank = rank
    ids = token_batches(100, num=1)[0]
    with torch.no_grad():
        reference = model(**ids).logits
        deployed, records = deployable_model(model, ranks)
        assert [r.name for r in records] == list(ranks)  # one record per layer, in order
        assert {type(deployed.get_submodule(n)) for n in ranks} <= {DenseLinear, GaugeLinear,
                                                                     FactorLinear}
        forms = deployed(**ids).logits
        # float32 gauge fixing rounds at ~1e-4 of the logits' scale (test_gauge.py)
        assert (forms - reference).abs().max() <= 1e-3 * reference.abs().max()
        linear_forms_(deployed)
        kinds = {type(m) for m in deployed.modules()}
        assert not kinds & {DenseLinear, GaugeLinear, FactorLinear}
        torch.testing.assert_close(deployed(**ids).logits, forms, rtol=1e-5, atol=1e-5)
    assert all(type(m).__name__.startswith("Nested") for m in nested_layers(model).values())


# --- the cache folder ----------------------------------------------------------------------

@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXRANK_CACHE", str(tmp_path / "flexrank-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(host_module, "measure_matmul_gflops", lambda: 80.0)
    monkeypatch.setattr(host_module, "measure_copy_gbps", lambda: 20.0)
    return tmp_path


def test_cache_dir_rule(caches, monkeypatch):
    assert cache_dir() == caches / "flexrank-cache"
    assert cache_dir("models", "x") == caches / "flexrank-cache" / "models" / "x"
    monkeypatch.setenv("FLEXRANK_CACHE", "")  # empty means unset
    assert cache_dir("host.json") == caches / "xdg" / "flexrank" / "host.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == caches / "home" / ".cache" / "flexrank"


def test_every_cache_lands_under_flexrank_cache(caches, monkeypatch):
    root = caches / "flexrank-cache"
    # the host measurement
    measured = host_module.measure_host(refresh=True)
    assert json.loads((root / "host.json").read_text())[measured.key]["compute_gflops"] == 80.0
    # the GGUF conversion (the slow de-quantising load replaced by a tiny model)
    gguf = caches / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    source = tiny_gpt2()
    monkeypatch.setattr(models, "_load_gguf", lambda path: (source, char_tokenizer()))
    loaded, _ = models._load_gguf_cached(gguf)
    converted = list((root / "models").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
    for (name, p), q in zip(source.state_dict().items(), loaded.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), name
    # the export work folder of a plain model
    fast = fast_compress_config()
    work = _default_work_dir("smollm2-135m", fast)  # keyed on the model's identity (issue 21)
    assert work.parent == root / "compress" and work.name.startswith("smollm2-135m-")
    # and on the settings: other budgets (or other fast defaults) get their own
    assert _default_work_dir("smollm2-135m", fast_compress_config()) == work
    assert _default_work_dir("smollm2-135m", fast_compress_config((1.0, 0.5))) != work
    refit = replace(fast, distill=replace(fast.distill, full_budget="refit"))
    assert _default_work_dir("smollm2-135m", refit) != work
    more = replace(fast, distill=replace(fast.distill, steps=fast.distill.steps * 2))
    assert _default_work_dir("smollm2-135m", more) == work  # resumes, trains further
    assert not (caches / "xdg").exists() and not (caches / "home").exists()


# --- the model kind ------------------------------------------------------------------------

@pytest.mark.parametrize("build, kind, kv_bytes", [
    (tiny_llama, "decoder", 2 * 2 * 2 * 8 * 4),  # layers × (K, V) × kv heads × head dim × 4 B
    (tiny_gpt2, "decoder", 2 * 2 * 4 * 8 * 4),
    (tiny_bert, "encoder", 0),
    (tiny_cnn, "module", 0),
])
def test_model_kind_and_cost_model_agree(build, kind, kv_bytes):
    model = factorised(build())
    assert model_kind(model) == kind
    cost = budget_cost(ElasticModel(model, nested_plan(model, (1.0,))), 1.0)
    assert cost.encoder == (kind != "decoder")
    assert cost.kv_bytes_per_token == kv_bytes


# --- one definition each -------------------------------------------------------------------

def definitions(name: str) -> list[str]:
    """Modules that bind `name` at their top level (assignment or def)."""
    found = []
    for path in SOURCES:
        for node in ast.parse(path.read_text()).body:
            targets = ([t.id for t in node.targets if isinstance(t, ast.Name)]
                       if isinstance(node, ast.Assign) else
                       [node.name] if isinstance(node, ast.FunctionDef) else [])
            if name in targets:
                found.append(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("name, home", [
    ("RANK_LEVEL", "flexrank/formats.py"),
    ("ONNX_IR_VERSION", "flexrank/formats.py"),
    ("BUDGET_TOLERANCE", "flexrank/budget.py"),
    ("same_budget", "flexrank/budget.py"),
    ("gauge_fixed_params", "flexrank/planning/costs.py"),
    ("cache_dir", "flexrank/io.py"),
    ("model_kind", "flexrank/compress/models.py"),
    ("swap_modules_", "flexrank/compress/surgery.py"),
])
def test_each_primitive_has_one_home(name, home):
    assert definitions(name) == [home]


def test_modules_are_swapped_only_by_the_walk():
    """`setattr(<module>, <child name>, ...)` appears in the walk alone."""
    swaps = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr"
                    and getattr(node.args[0], "id", None) in ("parent", "model", "module")):
                swaps.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert len(swaps) == 1 and swaps[0].startswith("flexrank/compress/surgery.py:"), swaps
