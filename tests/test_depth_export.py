"""ONNX export of a budget with replaced blocks: onnxruntime (through optimum's
ORTModelForCausalLM, a runtime we did not write) gives PyTorch's logits, and each donor
weight is one initializer read by both the donor block and its stand-in."""

from __future__ import annotations

import copy
import logging
from collections import defaultdict

import numpy as np
import onnx
import torch
from conftest import char_tokenizer, token_batches
from onnx import numpy_helper
from test_depth_elastic import elastic_setup  # noqa: F401  (the module-scoped fixture)

from flexrank.compress.depth import make_depth_elastic_
from flexrank.compress.elastic import ElasticModel
from flexrank.exporters import export

logging.getLogger("optimum").setLevel(logging.ERROR)


def test_replaced_budget_exports_equal_to_pytorch_with_shared_weights_once(
        elastic_setup, tmp_path):  # noqa: F811
    from optimum.onnxruntime import ORTModelForCausalLM

    _, factorised, _, stats, plan = elastic_setup
    beta = plan.budgets[0]
    replaced = plan.replaced_for(beta)
    assert replaced, plan.adapter_ranks
    model = copy.deepcopy(factorised)
    make_depth_elastic_(model, plan, stats)
    elastic = ElasticModel(model, plan, tokenizer=char_tokenizer(), model_id="tiny-depth")
    manifest = export(elastic, tmp_path, layout="per-budget", budgets=[beta])
    graph_path = tmp_path / manifest["budgets"][0]["graph"]

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
    assert np.isfinite(manifest["budgets"][0]["validation"]["max_abs_diff"])
