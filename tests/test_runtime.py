"""Budget costs from an ElasticModel, and `ElasticSession` on tiny exported bundles: greedy
generation equal to PyTorch at every budget, budget switching without reloading (elastic
layout), encoders, and broken bundles refused."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import char_tokenizer, tiny_bert, token_batches
from elastic_fixtures import tiny_elastic

from flexrank.compress.budget_cost import budget_cost
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.select import nested_layers
from flexrank.compress.surgery import factorize_
from flexrank.exporters import export
from flexrank.exporters.common.validate import torch_greedy
from flexrank.manifest import BundleError, CorruptFileError
from flexrank.planning.costs import gauge_fixed_params as layer_cost
from flexrank.runtime.kv_cache import CacheDecoder
from flexrank.runtime.session import ElasticSession

logging.getLogger("optimum").setLevel(logging.ERROR)
PROMPT = np.array([[5, 9, 14, 3, 22, 7]])


@pytest.fixture(scope="module")
def llama():
    student, teacher, plan, _, _ = tiny_elastic()
    return ElasticModel(student, plan, char_tokenizer(), model_id="tiny-llama"), teacher


@pytest.fixture(scope="module")
def elastic_bundle(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("elastic")
    export(llama[0], folder, layout="elastic")
    return folder


def test_budget_cost_counts_the_deployed_model(llama):
    em, teacher = llama
    dense = sum(p.numel() for p in teacher.parameters())  # tied table counted once
    config = teacher.config
    full = budget_cost(em, 1.0)
    # full rank is the dense model: every weight one multiply-add, stored once, all read
    # per token except that the tied table is read once (as the head) plus one row
    assert full.flops_per_token == 2 * dense
    assert full.weight_bytes_total == 4 * dense
    assert full.weight_bytes_per_token == 4 * (dense + config.hidden_size)
    head_dim = config.hidden_size // config.num_attention_heads
    assert full.kv_bytes_per_token == (config.num_hidden_layers * 2
                                       * config.num_key_value_heads * head_dim * 4)
    low = budget_cost(em, 0.6)
    saved = 0
    for name, layer in nested_layers(em.model).items():
        m, n = layer.U.shape[0], layer.V.shape[0]
        saved += m * n - layer_cost(m, n, em.layer_ranks(0.6)[name])
    assert saved > 0 and low.flops_per_token == 2 * (dense - saved)
    assert budget_cost(em, 1.0, "int8").weight_bytes_total == dense
    assert layer_cost(6, 8, 3) == 3 * (6 + 8 - 3) and layer_cost(6, 8, 6) == 48


def test_elastic_session_generates_like_pytorch_and_switches_without_reloading(
        llama, elastic_bundle):
    em, _ = llama
    session = ElasticSession(elastic_bundle, budget=1.0, threads=1)
    assert session.load_s > 0 and session.budgets == [0.6, 0.8, 1.0]
    # the rank Slices do not touch the cache: it is updated in place at every level
    assert all(e["kv_cache_in_place"] for e in session.manifest["budgets"])
    for beta in (1.0, 0.6, 0.8):
        session.set_budget(beta)
        em.set_budget(beta)
        got = session.generate(PROMPT, max_new_tokens=8, stop_at_eos=False)
        expected = torch_greedy(em.model, torch.from_numpy(PROMPT), 8)[0].tolist()
        assert got.token_ids == expected, beta
        assert got.ttft_s > 0 and len(got.decode_ms) == 7
        assert got.decode_ms_median <= got.decode_ms_p90
    assert session.loaded_graphs == 1  # one onnxruntime session served every budget
    text = session.generate("to be or", max_new_tokens=4, stop_at_eos=False)
    assert text.prompt_tokens == len("to be or") and isinstance(text.text, str)
    figures = session.measure(prompt_tokens=12, new_tokens=5)
    assert figures["label"] == "measured on host" and figures["decode_ms_median"] > 0
    assert figures["peak_rss_mb"] > 0 and figures["prompt_tokens"] == 12


def test_per_budget_bundle_updates_the_cache_in_place_like_pytorch(llama, tmp_path):
    em, _ = llama
    manifest = export(em, tmp_path, budgets=[0.6, 1.0])
    assert [e["kv_cache_in_place"] for e in manifest["budgets"]] == [True, True]
    session = ElasticSession(tmp_path, threads=1)
    for beta in (0.6, 1.0):
        session.set_budget(beta)
        em.set_budget(beta)
        got = session.generate(PROMPT, max_new_tokens=12, stop_at_eos=False).token_ids
        assert got == torch_greedy(em.model, torch.from_numpy(PROMPT), 12)[0].tolist(), beta
    # buffers too small from the start double as they fill, and hold what the cache fed
    # back as arrays holds
    in_place = CacheDecoder(session.session, in_place=True, capacity=2)
    copied = CacheDecoder(session.session, in_place=False)
    ids = PROMPT
    for _ in range(5):
        logits = in_place(ids)
        np.testing.assert_allclose(logits, copied(ids), rtol=1e-5, atol=1e-5)
        ids = logits[:, -1].argmax(-1)[:, None]
    assert in_place.capacity == 16 and in_place.past_len == copied.past_len == 10
    for name, buffer in in_place.buffers.items():
        present = copied.past[name.replace("past_key_values.", "present.")]
        np.testing.assert_allclose(buffer[:, :, :10], present, rtol=1e-6, atol=1e-6)
        assert not buffer[:, :, 10:].any()
    with pytest.raises(ValueError, match="batch of 1, not 2"):
        in_place(np.concatenate([ids, ids]))


def test_shared_layout_switches_budgets(llama, tmp_path):
    em, _ = llama
    manifest = export(em, tmp_path, layout="shared", budgets=[0.6, 1.0])
    assert [e["kv_cache_in_place"] for e in manifest["budgets"]] == [True, True]
    session = ElasticSession(tmp_path, threads=1)
    assert session.beta == 1.0  # no decision in the manifest: the largest budget
    for beta in (0.6, 1.0):
        em.set_budget(beta)
        got = session.set_budget(beta).generate(PROMPT, 6, stop_at_eos=False).token_ids
        assert got == torch_greedy(em.model, torch.from_numpy(PROMPT), 6)[0].tolist()


def test_bad_budget_and_corrupt_bundle_are_refused(elastic_bundle, tmp_path):
    session = ElasticSession(elastic_bundle, threads=1)
    with pytest.raises(BundleError, match=r"budget 0.5 is not in this bundle.*0.6"):
        session.set_budget(0.5)
    with pytest.raises(ValueError, match="encode"):
        session.encode(PROMPT)
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(elastic_bundle, copy)
    graph = copy / session.entry["graph"]
    graph.write_bytes(graph.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CorruptFileError, match="does not match the manifest"):
        ElasticSession(copy)


def test_encoder_bundle_encodes_like_pytorch(tmp_path):
    from test_export_onnx import nested_plan

    model = tiny_bert()
    factorize_(model, collect_covariances(model, token_batches(100), progress=False),
               progress=False)
    em = ElasticModel(model, nested_plan(model), model_id="tiny-bert")
    export(em, tmp_path, budgets=[0.5])
    session = ElasticSession(tmp_path, threads=1)
    with pytest.raises(ValueError, match="encoder"):
        session.generate(PROMPT)
    out = session.encode(PROMPT)
    em.set_budget(0.5)
    with torch.no_grad():
        ids = torch.from_numpy(PROMPT)
        expected = em.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                            token_type_ids=torch.zeros_like(ids)).last_hidden_state
    np.testing.assert_allclose(out["last_hidden_state"], expected.numpy(), atol=1e-4)
    assert session.measure(prompt_tokens=8)["latency_ms"] > 0


BATCH = [[5, 9, 14, 3, 22], [7, 11, 30, 4, 9, 18, 25, 6, 13],
         [8, 3, 19, 27, 5, 12, 40, 2, 33, 15, 21, 9]]


@pytest.mark.parametrize("layout", ["per-budget", "elastic"])
def test_batched_generation_gives_each_prompt_its_own_tokens(llama, layout, tmp_path):
    """Three left-padded prompts (5, 9, 12 tokens): one result per row, each PyTorch's
    greedy tokens for that prompt alone; the same through a padded array and its mask."""
    em, _ = llama
    export(em, tmp_path, layout=layout, budgets=[0.6, 1.0])
    session = ElasticSession(tmp_path, budget=0.6, threads=1)
    em.set_budget(0.6)
    expected = [torch_greedy(em.model, torch.tensor([row]), 10)[0].tolist() for row in BATCH]
    results = session.generate(BATCH, max_new_tokens=10, stop_at_eos=False)
    assert [r.token_ids for r in results] == expected
    assert [r.prompt_tokens for r in results] == [5, 9, 12]
    ids = np.zeros((3, 12), np.int64)
    mask = np.zeros((3, 12), np.int64)
    for i, row in enumerate(BATCH):
        ids[i, 12 - len(row):], mask[i, 12 - len(row):] = row, 1
    padded = session.generate(ids, max_new_tokens=10, stop_at_eos=False, attention_mask=mask)
    assert [r.token_ids for r in padded] == expected
    alone = session.generate(BATCH[1], max_new_tokens=10, stop_at_eos=False)
    assert alone.token_ids == expected[1]


def test_batched_generation_refuses_what_it_cannot_read(llama, tmp_path):
    em, _ = llama
    export(em, tmp_path, budgets=[1.0])
    session = ElasticSession(tmp_path, threads=1)
    right_padded = np.array([[1, 1, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="left-pad"):
        session.generate(np.array([[5, 6, 2], [5, 6, 7]]), 2, attention_mask=right_padded)
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 2\)"):
        session.generate(np.array([[5, 6, 2], [5, 6, 7]]), 2, attention_mask=np.ones((2, 2)))
    with pytest.raises(ValueError, match="at least one token"):
        session.generate([[5, 6], []], 2)


def test_budget_cost_counts_the_biases_of_factorised_layers():
    """GPT-2's projections have biases, kept at every rank: at full rank the cost is the
    dense model's, every parameter counted once (the biases were left out before)."""
    from conftest import tiny_gpt2, token_batches
    from elastic_fixtures import nested_plan

    from flexrank.compress.covariance import collect_covariances
    from flexrank.compress.surgery import factorize_

    model = tiny_gpt2()
    dense = sum(p.numel() for p in model.parameters())  # tied table once, biases included
    biases = sum(m.bias.numel() for m in model.modules()
                 if getattr(m, "bias", None) is not None and m.bias.dim() == 1
                 and type(m).__name__ == "Conv1D")
    assert biases > 0
    factorize_(model, collect_covariances(model, token_batches(100), progress=False),
               progress=False)
    em = ElasticModel(model, nested_plan(model), model_id="tiny-gpt2")
    full = budget_cost(em, 1.0)
    assert full.weight_bytes_total == 4 * dense
    assert full.dense_weight_bytes_total == 4 * dense
