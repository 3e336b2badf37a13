"""ONNX export of a budget with replaced blocks: onnxruntime (through optimum's
ORTModelForCausalLM, a runtime we did not write) gives PyTorch's logits, and each donor
weight is one initializer read by both the donor block and its stand-in."""

from __future__ import annotations

import copy
import logging
from collections import defaultdict

import numpy as np
import onnx
import pytest
import torch
from conftest import char_tokenizer, token_batches
from onnx import numpy_helper
from test_depth_checkpoint import HIDDEN, INTERMEDIATE, KV, LINEAR_SHAPES
from test_depth_elastic import elastic_setup  # noqa: F401  (the module-scoped fixture)

from flexrank.compress.depth import DepthSwitch, make_depth_elastic_
from flexrank.compress.elastic import ElasticModel
from flexrank.exporters import export

logging.getLogger("optimum").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def exported(elastic_setup, tmp_path_factory):  # noqa: F811
    """The smallest budget (blocks replaced) exported per-budget to ONNX; norm weights
    made distinct (random) so that no two initializers are equal by chance (the exporter
    stores equal constants once, which would hide a weight stored twice)."""
    _, factorised, _, stats, plan = elastic_setup
    beta = plan.budgets[0]
    model = copy.deepcopy(factorised)
    make_depth_elastic_(model, plan, stats)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    elastic = ElasticModel(model, plan, tokenizer=char_tokenizer(), model_id="tiny-depth")
    elastic.set_budget(1.0)  # no block replaced: the export must switch them by itself
    out = tmp_path_factory.mktemp("depth-export")
    manifest = export(elastic, out, layout="per-budget", budgets=[beta])
    return elastic, plan, beta, manifest, out / manifest["budgets"][0]["graph"]


def test_replaced_budget_exports_equal_to_pytorch_with_shared_weights_once(exported):
    from optimum.onnxruntime import ORTModelForCausalLM

    elastic, plan, beta, manifest, graph_path = exported
    model = elastic.model
    replaced = plan.replaced_for(beta)
    assert replaced, plan.adapter_ranks
    # exported at β's blocks the first time (a graph of other blocks fails validation and
    # is exported again with fewer gauge-fixed layers, or raises when it has none)
    assert "form_fallbacks" not in manifest["budgets"][0]
    assert not any(s.replaced for s in model.modules() if isinstance(s, DepthSwitch))

    ort_model = ORTModelForCausalLM.from_pretrained(graph_path.parent, local_files_only=True)
    elastic.set_budget(beta)
    for batch in token_batches(100, num=2, batch=2, seq=12, seed=5):
        with torch.no_grad():
            expected = model(**batch, use_cache=False).logits
            got = ort_model(**batch).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    graph = onnx.load(graph_path)
    readers = defaultdict(set)  # initializer -> (block, in its stand-in?) of its readers
    for node in graph.graph.node:
        parts = node.name.split("/")  # "/model/layers.3/depth_stand_in/mlp/..."
        if len(parts) > 3 and parts[2].startswith("layers."):
            for name in node.input:
                readers[name].add((parts[2], parts[3] == "depth_stand_in"))
    for stand_in, (donor, _rank) in replaced.items():
        stand_in_key = (stand_in.split(".", 1)[1], True)
        donor_key = (donor.split(".", 1)[1], False)
        shared = [name for name, who in readers.items() if {stand_in_key, donor_key} <= who]
        assert len(shared) >= 7, (stand_in, donor, shared)  # every donor layer's weights
    contents = defaultdict(list)  # no weight stored twice under two names
    for init in graph.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.size >= 64:
            contents[(array.shape, array.tobytes())].append(init.name)
    assert not [names for names in contents.values() if len(names) > 1]


def _by_form(m: int, n: int, rank: int, form: str) -> int:
    """Numbers a layer of shape (m, n) at `rank` stores in each form, written out."""
    return {"dense": m * n, "plain": rank * (m + n), "gauge": rank * (m + n - rank)}[form]


def test_manifest_counts_a_stand_in_as_shared_weights_plus_adapters(exported):
    """The budget's manifest entry against a count made by hand from the tiny Llama's
    dimensions (a replaced block: its stand-in's adapters U_a, V_a and output scales, the
    donor's weights not again; its own layers and norms not at all) and against the
    numbers the ONNX graph stores."""
    _, plan, beta, manifest, graph_path = exported
    entry = manifest["budgets"][0]
    replaced = plan.replaced_for(beta)
    layers = {layer["name"]: layer for layer in entry["layers"]}
    blocks = [f"model.layers.{i}" for i in range(4)]
    factorised = 0
    for block in blocks:
        for rel, (m, n) in LINEAR_SHAPES.items():
            if block in replaced:
                assert f"{block}.{rel}" not in layers  # not deployed at this budget
                a = min(replaced[block][1], m, n)
                layer = layers[f"{block}.depth_stand_in.{rel}"]
                assert (layer["form"], layer["rank"], layer["params"]) == (
                    "shared", a, a * (m + n) + m)
            else:
                layer = layers[f"{block}.{rel}"]
                assert layer["params"] == _by_form(m, n, layer["rank"], layer["form"])
            factorised += layer["params"]
    assert len(layers) == 4 * len(LINEAR_SHAPES)
    assert entry["forms"]["shared"] == len(replaced) * len(LINEAR_SHAPES)
    params = entry["params"]
    assert params["factorised"] == factorised
    assert params["factorised_dense"] == 4 * (2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN
                                              + 3 * INTERMEDIATE * HIDDEN)
    # embeddings (tied head) + final norm + two norms per block (a stand-in's own)
    assert params["other"] == 100 * HIDDEN + HIDDEN + 4 * 2 * HIDDEN
    assert params["whole_model"] == factorised + params["other"]
    # the graph: every stored float weight (RoPE tables and scalar constants apart)
    graph = onnx.load(graph_path)
    stored = sum(int(np.prod(init.dims)) for init in graph.graph.initializer
                 if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
                 and init.name not in ("cos_cache", "sin_cache") and len(init.dims) > 0)
    assert stored == params["whole_model"]


@pytest.mark.slow
def test_replaced_budget_runs_in_executorch_with_shared_weights_once(elastic_setup,  # noqa: F811
                                                                     tmp_path):
    """The same budget as an ExecuTorch program: the exporter's strict float check in
    ExecuTorch's own runtime (logits and greedy tokens against PyTorch) passes, and the
    weights file holds the numbers the manifest counts (each donor weight once)."""
    pytest.importorskip("executorch.runtime")
    import flexrank.exporters.executorch.export  # noqa: F401  (registers "executorch")
    from flexrank.exporters.executorch.export import ExecutorchExportConfig
    from flexrank.exporters.executorch.validate import load_method

    _, factorised, _, stats, plan = elastic_setup
    beta = plan.budgets[0]
    replaced = plan.replaced_for(beta)
    model = copy.deepcopy(factorised)
    make_depth_elastic_(model, plan, stats)
    elastic = ElasticModel(model, plan, tokenizer=char_tokenizer(), model_id="tiny-depth")
    elastic.set_budget(1.0)  # no block replaced: the export must switch them by itself
    manifest = export(elastic, tmp_path, format="executorch", budgets=[beta],
                      config=ExecutorchExportConfig(max_seq_len=64))
    (entry,) = manifest["budgets"]
    assert entry["validation"]["generation_match"] is True
    # and against PyTorch at β, run here: the program holds β's stand-ins
    forward = load_method(tmp_path / entry["graph"])
    elastic.set_budget(beta)
    for ids in token_batches(100, num=1, batch=2, seq=12, seed=5)[0]["input_ids"]:
        got = forward.execute([ids[None], torch.arange(len(ids))])[0]
        with torch.no_grad():
            expected = model(input_ids=ids[None], use_cache=False).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert entry["forms"]["shared"] == len(replaced) * len(LINEAR_SHAPES)
    # float32: 4 bytes a number; the weights file pads to 4 KiB pages (90112 bytes for
    # 80256 here). A donor block stored again would add its kept layers' numbers
    data = entry["program"]["data_bytes"]
    whole = 4 * entry["params"]["whole_model"]
    donor_block = min(sum(layer["params"] for layer in entry["layers"]
                          if layer["name"].startswith(donor + "."))
                      for donor, _rank in replaced.values())
    assert whole <= data < whole + 4 * donor_block, (data, whole, donor_block)


def test_elastic_layout_refuses_a_plan_that_replaces_blocks(elastic_setup, tmp_path):  # noqa: F811
    """One graph picks its budget by an input and cannot switch blocks: refused up front
    (it used to fail validation with a bare logits mismatch)."""
    _, factorised, _, stats, plan = elastic_setup
    model = copy.deepcopy(factorised)
    make_depth_elastic_(model, plan, stats)
    elastic = ElasticModel(model, plan, tokenizer=char_tokenizer(), model_id="tiny-depth")
    with pytest.raises(ValueError, match="elastic layout .* cannot switch blocks.* per-budget"):
        export(elastic, tmp_path, layout="elastic", budgets=[plan.budgets[0], 1.0])
