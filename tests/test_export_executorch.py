"""ExecuTorch export of tiny nested models: every budget lowered to an XNNPACK `.pte`, run
in `executorch.runtime` and compared with PyTorch (float32 tolerance, greedy generation
for the decoder); metadata methods; 8da4w with ranks aligned to the group size; clear
errors for untraceable models and unquantizable shapes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import char_tokenizer, tiny_bert, tiny_cnn, tiny_llama, token_batches
from elastic_fixtures import nested_plan
from torch import nn

import flexrank.exporters.executorch.export  # noqa: F401  (registers "executorch")
from flexrank.compress.config import FactorizeConfig
from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.surgery import factorize_
from flexrank.exporters import EXPORTERS, export
from flexrank.exporters.common.ranks import aligned_rank, aligned_ranks
from flexrank.exporters.common.validate import GENERATION_TOKENS, torch_greedy
from flexrank.exporters.executorch.export import ExecutorchExportConfig
from flexrank.exporters.executorch.program import ExecutorchTraceError, segment_layout
from flexrank.exporters.executorch.quant import QuantizationShapeError
from flexrank.exporters.executorch.validate import (
    at_ranks,
    constant_methods,
    load_method,
    pte_greedy,
)
from flexrank.manifest import load_manifest, write_manifest

FRACTIONS = (0.5, 0.75, 1.0)
LLAMA_FRACTIONS = (0.5, 1.0)  # each decoder budget costs ~15 s of XNNPACK lowering
pytest.importorskip("executorch.runtime")


@pytest.fixture(scope="module")
def cnn():
    model = tiny_cnn()
    factorize_(model, None, FactorizeConfig(method="plain"), progress=False)
    return ElasticModel(model, nested_plan(model), model_id="cnn")


def test_executorch_is_registered():
    assert EXPORTERS["executorch"] is flexrank.exporters.executorch.export.export_executorch


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


@pytest.mark.slow
def test_encoder_with_dynamic_batch_and_sequence(tmp_path):
    model = tiny_bert()
    factorize_(model, collect_covariances(model, token_batches(100), progress=False),
               progress=False)
    em = ElasticModel(model, nested_plan(model, (0.5,)), tokenizer=char_tokenizer())
    manifest = export(em, tmp_path, format="executorch")
    entry = manifest["budgets"][0]
    assert manifest["kind"] == "encoder" and entry["forms"] == {"gauge": 13}
    assert entry["validation"]["outputs"] == ["last_hidden_state", "pooler_output"]
    assert entry["validation"]["max_abs_diff"] < 1e-4
    assert entry["dynamic_axes"]["input_ids"] == [0, 1]
    ids = torch.randint(3, 100, (3, 7))  # another batch size and length
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    got = load_method(tmp_path / entry["graph"]).execute([ids, mask, types])
    em.set_budget(0.5)
    with torch.no_grad():
        expected = em.model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(got[0], expected.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], expected.pooler_output, atol=1e-4, rtol=1e-4)


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


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    factorize_(model, collect_covariances(model, token_batches(100), progress=False),
               progress=False)
    return ElasticModel(model, nested_plan(model, LLAMA_FRACTIONS), tokenizer=char_tokenizer(),
                        model_id="tiny_llama")


@pytest.fixture(scope="module")
def llama_bundle(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama-executorch")
    config = ExecutorchExportConfig(max_seq_len=64)
    return out, export(llama, out, format="executorch", config=config)


def test_llama_every_budget_validated_with_generation(llama, llama_bundle):
    out, manifest = llama_bundle
    assert load_manifest(out) == manifest
    assert manifest["kind"] == "decoder" and [b["beta"] for b in manifest["budgets"]] == \
        list(LLAMA_FRACTIONS)
    for entry in manifest["budgets"]:
        check = entry["validation"]
        assert check["generation_match"] is True
        assert check["max_abs_diff"] < 1e-4 and check["top1_agreement"] == 1.0
        assert entry["ranks"] == llama.layer_ranks(entry["beta"])
        assert {"model.pte", "tokenizer.json"} <= {f.rsplit("/", 1)[1] for f in entry["files"]}
    assert "gauge" in manifest["budgets"][0]["forms"]
    assert manifest["budgets"][-1]["forms"] == {"dense": 14}
    # apart from the exporter's report: each program through ExecuTorch's runtime, on a
    # prompt of its own, decodes as PyTorch does at that budget
    prompt = torch.tensor([[1, *range(40, 57)]])  # (1, 18)
    for entry in manifest["budgets"]:
        ours = pte_greedy(load_method(out / entry["graph"]), prompt, GENERATION_TOKENS)
        llama.set_budget(entry["beta"])
        assert ours.tolist() == torch_greedy(llama.model, prompt, GENERATION_TOKENS).tolist()


def test_llama_generation_through_the_runtime(llama, llama_bundle):
    """Independently of the exporter's own check: a longer prompt, prefill + 20 steps."""
    out, manifest = llama_bundle
    entry = manifest["budgets"][0]
    prompt = torch.tensor([[1, *range(10, 40)]])  # (1, 31)
    ours = pte_greedy(load_method(out / entry["graph"]), prompt, GENERATION_TOKENS)
    llama.set_budget(entry["beta"])
    assert ours.tolist() == torch_greedy(llama.model, prompt, GENERATION_TOKENS).tolist()


def test_llama_metadata_methods(llama, llama_bundle):
    out, manifest = llama_bundle
    entry = manifest["budgets"][0]
    metadata = constant_methods(out / entry["graph"])
    config = llama.model.config
    assert metadata["get_max_seq_len"] == 64 == entry["max_seq_len"]
    assert metadata["get_vocab_size"] == config.vocab_size == 100
    assert metadata["get_bos_id"] == 1 and metadata["get_eos_ids"] in (2, [2])
    assert metadata["get_n_layers"] == 2 and metadata["use_kv_cache"] is True
    assert metadata["get_flexrank_budget"] == pytest.approx(0.5)
    assert json.loads(metadata["get_flexrank_ranks_json"]) == entry["ranks"]
    assert list(_as_list(metadata["get_flexrank_ranks"])) == list(entry["ranks"].values())


def _operators(pte) -> set[str]:
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte.read_bytes()).program
    return {op.name for plan in program.execution_plan for op in plan.operators}


@pytest.mark.parametrize("custom_ops", [True, False])
def test_decoder_kv_cache_ops_and_chunked_prefill(llama, llama_bundle, tmp_path, custom_ops):
    """By default the program's KV cache and attention are ExecuTorch's LLM ops (as its
    own LLM export makes them): no index_put and no mask ops are left; with
    custom_ops=False, transformers' static cache. Either way, a prompt prefilled in two
    chunks (the second at start position 11) and then decoded step by step gives
    PyTorch's logits at every position."""
    if custom_ops:
        out, manifest = llama_bundle
        entry = manifest["budgets"][0]
    else:
        out = tmp_path
        (entry,) = export(llama, out, format="executorch", budgets=[0.5], config=(
            ExecutorchExportConfig(max_seq_len=64, custom_ops=False)))["budgets"]
    pte = out / entry["graph"]
    llm_ops = {"llama::custom_sdpa", "llama::update_cache"}
    ops = _operators(pte)
    if custom_ops:
        assert llm_ops <= ops and not {"aten::index_put", "aten::where"} & ops, ops
    else:
        assert not llm_ops & ops and "aten::index_put" in ops, ops
    assert constant_methods(pte)["use_sdpa_with_kv_cache"] is custom_ops
    ids = torch.tensor([[1, *range(20, 44)]])  # (1, 25)
    forward = load_method(pte)
    got = [forward.execute([ids[:, :11], torch.arange(11)])[0],
           forward.execute([ids[:, 11:18], torch.arange(11, 18)])[0]]
    got += [forward.execute([ids[:, t:t + 1], torch.tensor([t])])[0] for t in range(18, 25)]
    llama.set_budget(entry["beta"])
    with torch.no_grad():
        expected = llama.model(input_ids=ids).logits
    torch.testing.assert_close(torch.cat(got, dim=1), expected, atol=1e-4, rtol=1e-4)


def _as_list(value):
    return value if isinstance(value, list) else [value]


def test_constants_are_segments_outside_the_flatbuffer(llama_bundle):
    out, manifest = llama_bundle
    entry = manifest["budgets"][-1]
    layout = segment_layout(out / entry["graph"])
    assert layout == entry["program"]
    # the weights (about 17k float32 numbers, ~70 kB) live outside the flatbuffer: this
    # tied Llama keeps them in model.ptd (test_tied_table_is_stored_once)
    assert layout["data_file"] == "model.ptd"
    assert layout["segment_bytes"] + layout["data_bytes"] > 60_000 > layout["flatbuffer_bytes"]


def test_tied_table_is_stored_once(tmp_path):
    """A tied 4096 × 32 float table (512 KiB of the model's 585 KiB): the program and its
    weights file hold each weight once (one .pte held the table twice: 1.82× the unique
    bytes with a 4096 × 64 table), and the two files still compute the PyTorch model (the
    exporter's strict float check: logits and greedy tokens)."""
    torch.manual_seed(0)
    model = tiny_llama(vocab=4096)
    model.model.embed_tokens.weight.data = torch.randn(4096, 32) * 0.02
    unique = 4 * sum(p.numel() for p in model.parameters())  # a tied tensor counted once
    factorize_(model, collect_covariances(model, token_batches(4096), progress=False),
               progress=False)
    em = ElasticModel(model, nested_plan(model, (1.0,)), tokenizer=char_tokenizer())
    manifest = export(em, tmp_path, format="executorch",
                      config=ExecutorchExportConfig(max_seq_len=64))
    (entry,) = manifest["budgets"]
    assert entry["forms"] == {"dense": 14}  # the dense weights, as the model's
    assert entry["validation"]["generation_match"] is True
    names = {f.rsplit("/", 1)[1] for f in entry["files"]}
    assert {"model.pte", "model.ptd"} <= names
    program = entry["program"]
    # every weight once (the table twice would be + 88 %), alignment aside
    assert unique <= program["data_bytes"] < 1.02 * unique, (program, unique)
    assert program["segment_bytes"] < 0.1 * unique  # the XNNPACK graph, no weights


def test_untied_decoder_stays_one_file(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    factorize_(model, collect_covariances(model, token_batches(100), progress=False),
               progress=False)
    em = ElasticModel(model, nested_plan(model, (1.0,)), tokenizer=char_tokenizer())
    manifest = export(em, tmp_path, format="executorch",
                      config=ExecutorchExportConfig(max_seq_len=64))
    (entry,) = manifest["budgets"]
    assert "data_file" not in entry["program"]
    assert not any(f.endswith(".ptd") for f in entry["files"])


def test_executorch_refuses_other_layouts_and_quantizations(llama, tmp_path):
    with pytest.raises(ValueError, match="per-budget layout only"):
        export(llama, tmp_path, format="executorch", layout="shared")
    with pytest.raises(ValueError, match="group_size 16 is not supported"):
        ExecutorchExportConfig(group_size=16)
    with pytest.raises(ValueError, match="too short"):
        export(llama, tmp_path, format="executorch",
               config=ExecutorchExportConfig(max_seq_len=16))


# ---- 8da4w ------------------------------------------------------------------------------

def export_8da4w(elastic, out, **options) -> dict:
    """`export(..., quantize="8da4w")`: the registered exporter plus the manifest, called
    directly while `flexrank.exporters.export` lists only the ONNX quantizations."""
    body = EXPORTERS["executorch"](elastic, out, layout="per-budget",
                                   budgets=sorted(elastic.budgets), quantize="8da4w", **options)
    write_manifest(out, body)
    return load_manifest(out)


def wide_tiny_llama():
    """Layers wide enough for 32-groups below full rank: hidden 64, MLP 128, k/v 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


def test_aligned_ranks_are_group_multiples_and_stay_nested():
    for max_rank in (16, 40, 64, 100, 576):
        ranks = [aligned_rank(r, max_rank, 32) for r in range(1, max_rank + 1)]
        assert ranks == sorted(ranks)  # monotone: a nested plan stays nested
        assert ranks[-1] == max_rank  # full rank stays full (exported dense)
        assert all(r % 32 == 0 or r == max_rank for r in ranks)
    assert aligned_rank(47, 576, 32) == 32 and aligned_rank(48, 576, 32) == 64
    assert aligned_rank(5, 576, 32) == 32  # never below one group
    assert aligned_ranks({"a": 100, "b": 16}, {"a": 576, "b": 16}, 32) == {"a": 96, "b": 16}


@pytest.mark.slow
def test_llama_8da4w_every_layer_quantized_with_aligned_ranks(tmp_path):
    model = wide_tiny_llama()
    factorize_(model, collect_covariances(model, token_batches(100), progress=False),
               progress=False)
    em = ElasticModel(model, nested_plan(model, (0.4,)), tokenizer=char_tokenizer())
    manifest = export_8da4w(em, tmp_path, config=ExecutorchExportConfig(max_seq_len=64))
    assert manifest["quantize"] == "8da4w"
    for entry in manifest["budgets"]:
        assert all(r % 32 == 0 for r in entry["ranks"].values())
        assert entry["plan_ranks"] == em.layer_ranks(entry["beta"])
        quantization = entry["quantization"]
        assert quantization["skipped"] == {}
        quantized = set(quantization["quantized"])
        for name in entry["ranks"]:  # every factorised layer: dense, or both factors
            assert name in quantized or {f"{name}.down", f"{name}.up"} <= quantized
        assert "lm_head" in quantized  # the (untied in the program) head, input width 64
        check = entry["validation"]
        assert check["top1_agreement"] >= 0.9 and check["max_abs_diff"] < 0.2
        assert check["generation_match"] is True
        twin = check["quantized_reference"]  # the lowering itself, apart from int4 error
        assert twin["top1_agreement"] == 1.0 and twin["max_abs_diff"] < 0.02
        # apart from that report: the program's logits through ExecuTorch's runtime on an
        # input of the test's own, against the float PyTorch model at the exported ranks
        ids = torch.randint(3, 100, (1, 24), generator=torch.Generator().manual_seed(7))
        logits = load_method(tmp_path / entry["graph"]).execute(
            [ids, torch.arange(ids.shape[1])])[0]
        with at_ranks(em.model, entry["ranks"]) as reference, torch.no_grad():
            expected = reference(input_ids=ids).logits
        agreement = (logits.argmax(-1) == expected.argmax(-1)).float().mean().item()
        assert agreement >= 0.9 and (logits - expected).abs().max().item() < 0.2
        assert json.loads(constant_methods(tmp_path / entry["graph"])[
            "get_flexrank_ranks_json"]) == entry["ranks"]
    low = manifest["budgets"][0]
    assert "plain" in low["forms"] and "gauge" not in low["forms"]  # see QUANTIZED_MAX_...
    assert low["ranks"] != low["plan_ranks"]  # alignment moved some ranks
    float_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert low["bytes"] < float_bytes  # int4 weights


def test_unquantizable_shape_is_a_clear_error(tmp_path):
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10))
    factorize_(model, None, FactorizeConfig(method="plain"), progress=False)
    em = ElasticModel(model, nested_plan(model, (1.0,)))
    with pytest.raises(QuantizationShapeError, match="input width 20 is not a multiple of the "
                                                     "group size 32"):
        export_8da4w(em, tmp_path, sample_inputs=torch.randn(2, 20))


def test_the_llm_ops_are_refused_for_a_sliding_window():
    """ExecuTorch's custom_sdpa has no sliding window: for a Mistral with a window of 4 the
    eager check names it (the exporter then keeps transformers' static cache, whose own
    export of sliding windows transformers 4.57 does not build), and for the same model
    without a window the LLM ops give PyTorch's logits."""
    from test_architectures import build

    from flexrank.exporters.executorch.program import LLMCustomOpsDecoder

    ids = torch.tensor([[1, *range(20, 31)]])  # (1, 12): three windows long
    windowed = build("mistral-window-4").model
    reason = LLMCustomOpsDecoder(windowed, 32).mismatch(ids)
    assert reason is not None and "sliding_window" in reason, reason
    windowed.config.sliding_window = None  # the same weights, attention over everything
    assert LLMCustomOpsDecoder(windowed, 32).mismatch(ids) is None
