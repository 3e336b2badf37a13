"""ExecuTorch export of tiny nested models: every budget lowered to an XNNPACK `.pte`, run
in `executorch.runtime` and compared with PyTorch (float32 tolerance, greedy generation
for the decoder); metadata methods; 8da4w with ranks aligned to the group size; clear
errors for untraceable models and unquantizable shapes."""

from __future__ import annotations

import json

import flexrank.exporters.executorch  # noqa: F401  (registers "executorch")
import pytest
import torch
from conftest import tiny_cnn
from flexrank.exporters import EXPORTERS, export, load_manifest
from flexrank.exporters.executorch_program import ExecutorchTraceError
from flexrank.exporters.executorch_validate import constant_methods, load_method
from torch import nn

from flexrank.elastic import ElasticModel
from flexrank.surgery import FactorizeConfig, factorize_
from flexrank.targets import nested_layers

FRACTIONS = (0.5, 0.75, 1.0)
pytest.importorskip("executorch.runtime")


class StandInPlan:
    """The three attributes of a NestedPlan that ElasticModel and the exporters use."""

    def __init__(self, table: dict[float, dict[str, int]]):
        self.table = table
        self.budgets = sorted(table)
        self.layer_names = list(table[self.budgets[0]])

    def ranks_for(self, beta):
        return dict(self.table[beta])


def nested_plan(model, fractions=FRACTIONS) -> StandInPlan:
    """Each layer keeps round(f · max_rank) at budget f: nested, full rank at 1.0."""
    layers = nested_layers(model)
    return StandInPlan({f: {name: max(1, round(f * layer.max_rank))
                            for name, layer in layers.items()} for f in fractions})


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def cnn():
    model = tiny_cnn()
    factorize_(model, None, FactorizeConfig(method="plain"), progress=False)
    return ElasticModel(model, nested_plan(model), model_id="cnn")


def test_executorch_is_registered():
    assert EXPORTERS["executorch"] is flexrank.exporters.executorch.export_executorch


def test_generic_module_every_budget_runs_in_executorch(cnn, tmp_path):
    sample = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    manifest = export(cnn, tmp_path, format="executorch", sample_inputs=sample)
    assert load_manifest(tmp_path) == manifest  # every sha256 checked
    assert manifest["export_format"] == "executorch" and manifest["kind"] == "module"
    assert [b["beta"] for b in manifest["budgets"]] == list(FRACTIONS)
    for entry in manifest["budgets"]:
        assert entry["files"] == [f"budget-{entry['beta']:g}/model.pte"]
        assert entry["validation"]["max_abs_diff"] < 1e-4
        assert entry["ranks"] == cnn.layer_ranks(entry["beta"])
        assert 0 in entry["dynamic_axes"]["x"]  # the batch axis stayed dynamic
        # another batch size through the program, against PyTorch at the same budget
        cnn.set_budget(entry["beta"])
        other = torch.randn(5, 3, 16, 16)
        with torch.no_grad():
            expected = cnn.model(other)
        got = load_method(tmp_path / entry["graph"]).execute([other])[0]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        metadata = constant_methods(tmp_path / entry["graph"])
        assert metadata["get_flexrank_budget"] == pytest.approx(entry["beta"])
        assert json.loads(metadata["get_flexrank_ranks_json"]) == entry["ranks"]
    assert "gauge" in manifest["budgets"][0]["forms"]
    assert manifest["budgets"][-1]["forms"] == {"dense": 4}


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: not traceable
            return x * 2
        return x


class WithBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(self.proj(x))


def test_untraceable_module_names_the_module(tmp_path):
    model = WithBranch()
    factorize_(model, None, FactorizeConfig(method="plain"), progress=False)
    em = ElasticModel(model, nested_plan(model, (1.0,)))
    with pytest.raises(ExecutorchTraceError, match="module 'gate' \\(DataDependent") as info:
        export(em, tmp_path, format="executorch", sample_inputs=torch.randn(2, 8))
    assert len(str(info.value)) < 1000 and "torch.cond" in str(info.value)
