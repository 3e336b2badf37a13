"""Rotary inside GroupQueryAttention (`do_rotary`) and packed QKV (`attention.pack_qkv`),
on a tiny random Llama with 16-wide heads (the op's own rotary needs multiples of 16).

References: PyTorch's logits and KV cache on a left-padded batch, a prompt and three
cached steps; the same graph simplified with the rotary as separate RotaryEmbedding nodes.
The op derives positions from the cache length, not from `position_ids` (its kernel reads
only position_ids[0, 0] on a first prompt): the cached keys of a left-padded row are then
PyTorch's rotated by that row's padding, and every logit is PyTorch's (see attention.py).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import char_tokenizer, token_batches
from elastic_fixtures import nested_plan
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.surgery import factorize_
from flexrank.exporters import export
from flexrank.exporters.common.entry import at_budget
from flexrank.exporters.onnx.convert import OnnxExportConfig
from flexrank.exporters.onnx.simplify import op_counts, simplify

logging.getLogger("optimum").setLevel(logging.ERROR)
LAYERS, HEADS, KV_HEADS, HEAD = 2, 4, 2, 16
PADDING = (0, 2, 5)  # left padding of the three rows
PROMPT, STEPS = 7, 3


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=HEADS * HEAD, intermediate_size=128,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    factorize_(model, collect_covariances(model, token_batches(100), progress=False),
               progress=False)
    return ElasticModel(model, nested_plan(model, (0.5, 1.0)), tokenizer=char_tokenizer(),
                        model_id="gqa_rotary_llama")


def feed_for(session, ids, mask, past=None) -> tuple[dict, np.ndarray]:
    """The graph's feed and Hugging Face's positions (cumsum of the mask - 1, padding 1)."""
    positions = np.where(mask == 1, mask.cumsum(-1) - 1, 1)[:, mask.shape[1] - ids.shape[1]:]
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for info in session.get_inputs():
        if info.name.startswith("past_key_values."):
            feed[info.name] = (np.zeros((ids.shape[0], KV_HEADS, 0, HEAD), np.float32)
                               if past is None
                               else past[info.name.replace("past_key_values.", "present.")])
    wanted = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in wanted}, positions


def decode(session, ids: np.ndarray, mask: np.ndarray, steps: np.ndarray) -> list[dict]:
    """The graph's outputs for the prompt and then each step's token, by name."""
    names = [o.name for o in session.get_outputs()]
    feed, _ = feed_for(session, ids, mask)
    outs = [dict(zip(names, session.run(None, feed), strict=True))]
    for step in steps.T:
        mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], axis=1)
        feed, _ = feed_for(session, step[:, None], mask, outs[-1])
        outs.append(dict(zip(names, session.run(None, feed), strict=True)))
    return outs


def torch_decode(model, ids: np.ndarray, mask: np.ndarray, steps: np.ndarray) -> list:
    with torch.no_grad():
        positions = np.where(mask == 1, mask.cumsum(-1) - 1, 1)
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions), use_cache=True)
        outs = [out]
        for step in steps.T:
            mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], axis=1)
            position = mask.cumsum(-1)[:, -1:] - 1
            out = model(input_ids=torch.from_numpy(step[:, None]),
                        attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(position),
                        past_key_values=out.past_key_values, use_cache=True)
            outs.append(out)
    return outs


def batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 100, (len(PADDING), PROMPT)).astype(np.int64)
    mask = np.ones_like(ids)
    for row, pad in enumerate(PADDING):
        mask[row, :pad] = 0
    return ids, mask, rng.integers(3, 100, (len(PADDING), STEPS)).astype(np.int64)


def keys_shifted_by_padding(model, keys: np.ndarray) -> np.ndarray:
    """PyTorch's cached keys (B, H_kv, T, D) of each row rotated by that row's left
    padding: the keys of a graph that rotates by index in the sequence, not by position."""
    shift = torch.tensor(PADDING)[:, None].expand(-1, keys.shape[2])  # (B, T)
    k = torch.from_numpy(keys)
    cos, sin = model.model.rotary_emb(k, shift)
    _, rotated = apply_rotary_pos_emb(k, k, cos, sin)
    return rotated.numpy()


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_rotary_inside_attention_matches_pytorch_on_a_left_padded_batch(llama, tmp_path, beta):
    manifest = export(llama, tmp_path, budgets=[beta])
    entry = manifest["budgets"][0]
    model = onnx.load(str(tmp_path / entry["graph"]), load_external_data=False)
    counts = op_counts(model)
    assert counts["RotaryEmbedding"] == 0 and counts["GroupQueryAttention"] == LAYERS
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    for node in gqa:
        attributes = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        assert attributes["do_rotary"] == 1 and attributes["rotary_interleaved"] == 0
        assert list(node.input[7:9]) == ["cos_cache", "sin_cache"] and node.input[9] == ""
    producers = {o: n for n in model.graph.node for o in n.output}
    if beta == 1.0:  # every layer dense: one q/k/v MatMul, handed over packed
        assert all(n.input[1] == n.input[2] == "" for n in gqa)
        assert all(producers[n.input[0]].op_type == "MatMul" for n in gqa)
        assert counts["Split"] == LAYERS  # gate/up's only
    assert entry["kv_cache_in_place"]

    session = ort.InferenceSession(str(tmp_path / entry["graph"]),
                                   providers=["CPUExecutionProvider"])
    ids, mask, steps = batch()
    got = decode(session, ids, mask, steps)
    with at_budget(llama, beta) as torch_model:
        want = torch_decode(torch_model, ids, mask, steps)
        real = mask.astype(bool)
        np.testing.assert_allclose(got[0]["logits"][real], want[0].logits.numpy()[real],
                                   atol=1e-4, rtol=1e-4)
        for ours, theirs in zip(got[1:], want[1:], strict=True):
            np.testing.assert_allclose(ours["logits"], theirs.logits.numpy(), atol=1e-4,
                                       rtol=1e-4)
        final = np.concatenate([mask, np.ones((len(mask), STEPS), np.int64)], axis=1)
        for i, layer in enumerate(want[-1].past_key_values.layers):
            keys, values = layer.keys.numpy(), layer.values.numpy()
            ours_k, ours_v = got[-1][f"present.{i}.key"], got[-1][f"present.{i}.value"]
            for row, pad in enumerate(PADDING):
                np.testing.assert_allclose(ours_v[row, :, pad:], values[row, :, pad:],
                                           atol=1e-4, rtol=1e-4)
                assert final[row, pad:].all()
            np.testing.assert_allclose(ours_k[0], keys[0], atol=1e-4, rtol=1e-4)  # no padding
            shifted = keys_shifted_by_padding(torch_model, keys)
            for row, pad in enumerate(PADDING):
                np.testing.assert_allclose(ours_k[row, :, pad:], shifted[row, :, pad:],
                                           atol=1e-4, rtol=1e-4)
            if i == 0:  # the shift is real: a padded row's keys are not PyTorch's
                assert np.abs(ours_k[2, :, 5:] - keys[2, :, 5:]).max() > 1e-2


def test_packed_rotary_inside_is_the_separate_rotary_graph_with_fewer_nodes(llama, tmp_path):
    """The unsimplified export simplified both ways: no RotaryEmbedding and no q/k/v Split
    left, 3 nodes fewer per block, the same logits and cache on an unpadded batch (both
    rotate by position 0, 1, ...), and PyTorch's."""
    entry = export(llama, tmp_path, budgets=[1.0],
                   config=OnnxExportConfig(simplify=False, validate=False))["budgets"][0]
    path = str(tmp_path / entry["graph"])
    hidden = HEADS * HEAD
    separate = simplify(onnx.load(path), HEADS, hidden, KV_HEADS, rotary_inside=False)
    inside = simplify(onnx.load(path), HEADS, hidden, KV_HEADS)
    before, after = op_counts(separate), op_counts(inside)
    assert (before["RotaryEmbedding"], before["Split"]) == (2 * LAYERS, 2 * LAYERS)
    assert (after["RotaryEmbedding"], after["Split"]) == (0, LAYERS)
    assert sum(before.values()) - sum(after.values()) == 3 * LAYERS
    ids, _, steps = batch()
    mask = np.ones_like(ids)
    runs = [decode(ort.InferenceSession(m.SerializeToString(),
                                        providers=["CPUExecutionProvider"]), ids, mask, steps)
            for m in (separate, inside)]
    for a, b in zip(*runs, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(b[name], a[name], atol=1e-5, rtol=1e-5)
    with at_budget(llama, 1.0) as torch_model:
        want = torch_decode(torch_model, ids, mask, steps)
    for ours, theirs in zip(runs[1], want, strict=True):
        np.testing.assert_allclose(ours["logits"], theirs.logits.numpy(), atol=1e-4, rtol=1e-4)
