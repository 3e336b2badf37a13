"""Half-precision models (issue: failures reported by users of peer tools, §2).

A tiny Llama loaded in bfloat16 or float16 goes through factorize_ and exports to ONNX and
ExecuTorch; the exported files run the model's own weights (an exact upcast to float32) and
agree with PyTorch running those weights in float32; the user's model is left in its dtype.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_llama, token_batches
from elastic_fixtures import nested_plan
from onnx import numpy_helper

from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.surgery import factorize_
from flexrank.exporters import export
from flexrank.exporters.common.precision import floating_dtypes, in_export_precision


def half_elastic(dtype: torch.dtype) -> ElasticModel:
    model = tiny_llama(seed=0).to(dtype)
    factorize_(model, collect_covariances(model, token_batches(100, num=4), progress=False),
               progress=False)
    return ElasticModel(model, nested_plan(model), None, model_id="tiny-half")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_exports_to_onnx_with_its_own_weights(tmp_path, dtype):
    elastic = half_elastic(dtype)
    before = {k: v.clone() for k, v in elastic.model.state_dict().items()}
    manifest = export(elastic, tmp_path, format="onnx", budgets=[0.5, 1.0])
    # the user's model is untouched: same dtype, same values
    assert floating_dtypes(elastic.model) == {dtype}
    for key, value in elastic.model.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    for entry in manifest["budgets"]:
        graph = tmp_path / entry["graph"]
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((3, 9), np.int64),
                "position_ids": np.tile(np.arange(9), (3, 1))}
        for i in session.get_inputs():
            if i.name.startswith("past_key_values"):
                _, heads, _, head_dim = i.shape  # (batch, kv heads, past, head dim)
                feed[i.name] = np.zeros((3, heads, 0, head_dim), np.float32)
        logits = session.run(["logits"], {k: v for k, v in feed.items() if k in names})[0]
        # reference: PyTorch on the same weights, upcast by hand (independent of the exporter)
        reference = copy.deepcopy(elastic.model).float()
        for name, layer in ElasticModel(reference, elastic.plan).layers.items():
            layer.rank = elastic.layer_ranks(entry["beta"])[name]
        with torch.no_grad():
            expected = reference(ids).logits.numpy()
        assert logits.dtype == np.float32
        np.testing.assert_allclose(logits, expected, atol=2e-5, rtol=1e-4)


def test_exported_weights_are_the_half_precision_values_exactly(tmp_path):
    elastic = half_elastic(torch.bfloat16)
    export(elastic, tmp_path, format="onnx", budgets=[1.0])
    graph = onnx.load(str(next(tmp_path.glob("budget-1/*.onnx"))))
    stored = {numpy_helper.to_array(t).tobytes() for t in graph.graph.initializer}
    table = elastic.model.get_input_embeddings().weight.detach().float().numpy()
    assert table.tobytes() in stored  # the embedding, upcast exactly, is stored as it is


def test_float32_models_are_exported_without_a_copy():
    elastic = half_elastic(torch.float32)
    same, names = in_export_precision(elastic)
    assert same is elastic and names == ["float32"]
    upcast, names = in_export_precision(half_elastic(torch.float16))
    assert names == ["float16"] and floating_dtypes(upcast.model) == {torch.float32}


@pytest.mark.slow
def test_bfloat16_model_exports_to_executorch(tmp_path):
    pytest.importorskip("executorch")
    from flexrank.exporters.common.validate import GENERATION_TOKENS, torch_greedy
    from flexrank.exporters.executorch.validate import load_method, pte_greedy

    elastic = half_elastic(torch.bfloat16)
    manifest = export(elastic, tmp_path, format="executorch", budgets=[0.5])
    assert floating_dtypes(elastic.model) == {torch.bfloat16}  # the user's model untouched
    # the program, run by ExecuTorch's runtime, decodes as PyTorch on the upcast weights
    program = load_method(tmp_path / manifest["budgets"][0]["graph"])
    prompt = torch.tensor([[1, *range(10, 22)]])  # (1, 13)
    reference = copy.deepcopy(elastic.model).float()
    for name, layer in ElasticModel(reference, elastic.plan).layers.items():
        layer.rank = elastic.layer_ranks(0.5)[name]
    ours = pte_greedy(program, prompt, GENERATION_TOKENS)
    assert ours.tolist() == torch_greedy(reference, prompt, GENERATION_TOKENS).tolist()
