"""Export options on a tiny Llama: int8 dynamic quantization, ORT format for mobile builds,
external data."""

from __future__ import annotations

import onnx
import pytest
from conftest import char_tokenizer, tiny_llama, token_batches
from elastic_fixtures import StandInPlan

from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.select import nested_layers
from flexrank.compress.surgery import factorize_
from flexrank.exporters import export
from flexrank.exporters.common.forms import FormPolicy
from flexrank.exporters.onnx.convert import OnnxExportConfig
from flexrank.manifest import load_manifest


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    factorize_(model, collect_covariances(model, token_batches(100), progress=False),
               progress=False)
    layers = nested_layers(model)
    plan = StandInPlan({f: {n: max(1, round(f * l.max_rank)) for n, l in layers.items()}
                        for f in (0.5, 1.0)})
    return ElasticModel(model, plan, tokenizer=char_tokenizer(), model_id="tiny-llama")


def test_int8_quantizes_weight_matmuls(llama, tmp_path):
    manifest = export(llama, tmp_path, quantize="int8")
    assert manifest["quantize"] == "int8"
    for entry in manifest["budgets"]:
        graph = onnx.load(tmp_path / entry["graph"])
        ops = {node.op_type for node in graph.graph.node}
        assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
        int8 = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8]
        assert len(int8) >= 14  # every factorised layer's weights (gauge-fixed: 2 per layer)
        check = entry["validation"]
        assert check["top1_agreement"] >= 0.9  # reported, not required to be exact
        assert check["max_abs_diff"] < 0.5 * check["max_abs_reference"] + 1.0


def test_ort_format_with_required_operators(llama, tmp_path):
    manifest = export(llama, tmp_path, format="ort", budgets=[0.5])
    entry = manifest["budgets"][0]
    assert entry["graph"].endswith(".ort")
    names = {f.rsplit("/", 1)[1] for f in entry["files"]}
    assert {"model.ort", "required_operators.config", "config.json"} <= names
    assert not any(n.endswith(".onnx") for n in names)
    assert entry["validation"]["generation_match"] is True  # validated from the .ort file
    config = (tmp_path / entry["graph"]).with_name("required_operators.config").read_text()
    assert "MatMul" in config
    load_manifest(tmp_path)


def test_ort_format_elastic(llama, tmp_path):
    manifest = export(llama, tmp_path, format="ort", layout="elastic")
    assert all(e["validation"]["generation_match"] for e in manifest["budgets"])
    assert {e["graph"] for e in manifest["budgets"]} == {"elastic/model.ort"}


def test_external_data_on_request(llama, tmp_path):
    manifest = export(llama, tmp_path, budgets=[0.5], config=OnnxExportConfig(external_data=True))
    entry = manifest["budgets"][0]
    assert "budget-0.5/model.onnx_data" in entry["files"]
    graph = tmp_path / entry["graph"]
    inits = onnx.load(graph, load_external_data=False).graph.initializer
    big = [i for i in inits if len(i.raw_data) >= 1024 or i.data_location == 1]
    assert big and all(i.data_location == onnx.TensorProto.EXTERNAL for i in big)
    assert entry["validation"]["generation_match"] is True


def test_shared_layout_refuses_ort_and_int8(llama, tmp_path):
    with pytest.raises(ValueError, match="ORT format"):
        export(llama, tmp_path, format="ort", layout="shared")
    with pytest.raises(ValueError, match="per-budget layout only"):
        export(llama, tmp_path, layout="elastic", quantize="int8")


def test_forced_plain_factors_match_and_cost_more(llama, tmp_path):
    gauge = export(llama, tmp_path / "gauge", budgets=[0.5])["budgets"][0]
    plain = export(llama, tmp_path / "plain", budgets=[0.5],
                   config=OnnxExportConfig(forms=FormPolicy(force_form="plain")))["budgets"][0]
    assert plain["forms"] == {"plain": 14} and gauge["forms"] == {"gauge": 14}
    assert plain["validation"]["generation_match"] is True
    saved = sum(x["rank"] ** 2 for x in gauge["layers"])  # the identity blocks not stored
    assert plain["params"]["factorised"] - gauge["params"]["factorised"] == saved


def test_onnx_scope_names():
    from flexrank.exporters.onnx.convert import onnx_scope

    assert onnx_scope("model.layers.0.mlp.down_proj") == "/model/layers.0/mlp/down_proj/"
    assert onnx_scope("transformer.h.11.attn.c_attn") == "/transformer/h.11/attn/c_attn/"


def test_int8_keeps_layers_with_outlier_inputs_in_float(tmp_path):
    from flexrank.exporters.onnx.convert import onnx_scope

    model = tiny_llama()
    factorize_(model, collect_covariances(model, token_batches(100), progress=False),
               progress=False)
    layers = nested_layers(model)
    plan = StandInPlan({0.5: {n: max(1, l.max_rank // 2) for n, l in layers.items()}})
    em = ElasticModel(model, plan, tokenizer=char_tokenizer())
    config = OnnxExportConfig(int8_outlier_ratio=4.0)  # tiny random model: ratios 3 to 6
    entry = export(em, tmp_path, quantize="int8", config=config)["budgets"][0]
    kept = entry["int8_float_layers"]
    assert kept and min(kept.values()) > 4.0 and len(kept) < len(layers)
    graph = onnx.load(tmp_path / entry["graph"]).graph
    quantized = {node.name.rsplit("/", 1)[0] for node in graph.node
                 if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")}
    assert quantized and not quantized & {onnx_scope(n).rstrip("/") for n in kept}, quantized


# ---- every registered format has a fixture that exports and checks a tiny model -------
# (optimum's exporter tests: a format registered without a fixture fails here)


def tiny_mlp_elastic() -> ElasticModel:
    """A generic two-layer module, plain-factorised, with one budget below full rank."""
    import torch
    from torch import nn

    from flexrank.compress.config import FactorizeConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    factorize_(model, None, FactorizeConfig(method="plain"), progress=False)
    layers = nested_layers(model)
    plan = StandInPlan({0.5: {n: max(1, l.max_rank // 2) for n, l in layers.items()}})
    return ElasticModel(model, plan, model_id="tiny-mlp")


def _check_onnx_file(format: str, suffix: str, tmp_path) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    elastic = tiny_mlp_elastic()
    sample = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    export(elastic, tmp_path, format=format, sample_inputs=sample)
    session = ort.InferenceSession(str(tmp_path / "budget-0.5" / f"model{suffix}"),
                                   providers=["CPUExecutionProvider"])
    other = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))  # another batch
    (got,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    elastic.set_budget(0.5)
    with torch.no_grad():
        expected = elastic.model(other).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def check_onnx(tmp_path) -> None:
    _check_onnx_file("onnx", ".onnx", tmp_path)


def check_ort(tmp_path) -> None:
    _check_onnx_file("ort", ".ort", tmp_path)


def check_executorch(tmp_path) -> None:
    import torch

    runtime = pytest.importorskip("executorch.runtime")
    elastic = tiny_mlp_elastic()
    sample = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    export(elastic, tmp_path, format="executorch", sample_inputs=sample)
    program = runtime.Runtime.get().load_program(tmp_path / "budget-0.5" / "model.pte")
    other = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))  # another batch
    (got,) = program.load_method("forward").execute([other])
    elastic.set_budget(0.5)
    with torch.no_grad():
        expected = elastic.model(other)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


FIXTURES = {"onnx": check_onnx, "ort": check_ort, "executorch": check_executorch}


def registered_formats() -> list[str]:
    from flexrank.exporters import exporters

    return sorted(exporters())


def test_every_registered_format_has_a_fixture():
    assert set(FIXTURES) == set(registered_formats())


@pytest.mark.parametrize("format", registered_formats())
def test_format_fixture_exports_and_matches_pytorch(format, tmp_path):
    assert format in FIXTURES, f"format {format!r} is registered but has no fixture in FIXTURES"
    FIXTURES[format](tmp_path)
