"""Every decoder family the ONNX exporter supports, on a tiny random model of that family.

Each model is factorised, exported at β = 0.5 (simplified graph, fused attention where it
matches) and then run by onnxruntime here, apart from the exporter's own validation: a
batch of three prompts (the fused rotary must take per-row positions) and one cached
decoding step must give PyTorch's logits. The README's architecture table lists the same
families. A family optimum cannot export is refused before any work.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers as T
from conftest import token_batches
from elastic_fixtures import nested_plan

from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.surgery import factorize_
from flexrank.exporters import export

COMMON = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)
# family -> (config class, model class, settings beyond COMMON)
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "llama-head-dim": (T.LlamaConfig, T.LlamaForCausalLM, {"head_dim": 16}),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": 8}),
    "mistral-window-16": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": 16}),
    # a window shorter than the validation sample: PyTorch's cache keeps only the window
    "mistral-window-4": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": 4}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {}),
    "phi": (T.PhiConfig, T.PhiForCausalLM, {"num_key_value_heads": 4}),
    # no position_ids input: positions are computed once for all rows inside the graph
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, {"head_dim": 8}),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {"head_dim": 8}),
    "olmo": (T.OlmoConfig, T.OlmoForCausalLM, {}),
    "granite": (T.GraniteConfig, T.GraniteForCausalLM, {}),
    "stablelm": (T.StableLmConfig, T.StableLmForCausalLM, {}),
    "gpt-neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, {}),
    "opt": (T.OPTConfig, T.OPTForCausalLM, {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    "falcon": (T.FalconConfig, T.FalconForCausalLM, {}),
}


def build(family: str) -> ElasticModel:
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = model_class(config_class(**{**COMMON, **extra})).eval()
    factorize_(model, collect_covariances(model, token_batches(100, num=2), progress=False),
               progress=False)
    return ElasticModel(model, nested_plan(model), None, model_id=family)


def run_graph(session, ids: np.ndarray, past: dict | None = None) -> tuple[np.ndarray, dict]:
    """logits (B, T, V) and the present.* arrays for `ids` after `past` (None: no cache)."""
    batch, length = ids.shape
    past_len = 0 if past is None else next(iter(past.values())).shape[2]
    feed = {"input_ids": ids, "attention_mask": np.ones((batch, past_len + length), np.int64),
            "position_ids": np.tile(np.arange(past_len, past_len + length), (batch, 1))}
    for node in session.get_inputs():
        if node.name.startswith("past_key_values."):
            _, heads, _, head_dim = node.shape  # (batch, kv heads, past, head dim)
            feed[node.name] = (np.zeros((batch, heads, 0, head_dim), np.float32) if past is None
                               else past[node.name.replace("past_key_values.", "present.")])
    wanted = {node.name for node in session.get_inputs()}
    outputs = [node.name for node in session.get_outputs()]
    values = session.run(outputs, {k: v for k, v in feed.items() if k in wanted})
    result = dict(zip(outputs, values, strict=True))
    return result.pop("logits"), result


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_exports_and_matches_pytorch_on_a_batch_and_a_cached_step(family, tmp_path):
    elastic = build(family)
    manifest = export(elastic, tmp_path / "bundle", format="onnx", budgets=[0.5])
    entry = manifest["budgets"][0]
    session = ort.InferenceSession(str(tmp_path / "bundle" / entry["graph"]),
                                   providers=["CPUExecutionProvider"])
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    elastic.set_budget(0.5)
    with torch.no_grad():
        expected = elastic.model(ids).logits.numpy()  # (3, 7, V), no cache
    prefill, present = run_graph(session, ids[:, :6].numpy())
    step, _ = run_graph(session, ids[:, 6:].numpy(), present)
    np.testing.assert_allclose(prefill, expected[:, :6], atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(step[:, 0], expected[:, 6], atol=1e-4, rtol=1e-3)


def test_an_unsupported_family_is_refused_before_any_work(tmp_path):
    class Custom(T.LlamaForCausalLM):
        pass

    config = T.LlamaConfig(**COMMON)
    config.model_type = "my-own-llama"
    torch.manual_seed(0)
    model = Custom(config).eval()
    factorize_(model, collect_covariances(model, token_batches(100, num=2), progress=False),
               progress=False)
    elastic = ElasticModel(model, nested_plan(model), None, model_id="custom")
    with pytest.raises(ValueError, match=r"my-own-llama.*not supported by the ONNX exporter"):
        export(elastic, tmp_path / "bundle", format="onnx", budgets=[0.5])
    assert not (tmp_path / "bundle").exists() or not any((tmp_path / "bundle").iterdir())
