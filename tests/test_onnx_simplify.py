"""Graph simplification (`exporters/onnx_simplify.py`): every rewrite keeps the numbers.

Small graphs are compared against the unsimplified graph on several concrete shapes; the
tiny Llama decoder against PyTorch on a left-padded batch, prefill and a cached step.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import char_tokenizer, tiny_llama
from onnx import TensorProto, helper, numpy_helper
from test_export_onnx import elastic

from flexrank.exporters import export
from flexrank.exporters.common.entry import at_budget
from flexrank.exporters.onnx.attention import kv_cache_in_place
from flexrank.exporters.onnx.convert import MIN_ROTARY_POSITIONS, OnnxExportConfig
from flexrank.exporters.onnx.simplify import (
    expand_target,
    fuse_sibling_matmuls,
    merge_common,
    op_counts,
    remove_unused,
    reshape_target,
    simplify,
)
from flexrank.runtime.kv_cache import CacheDecoder

logging.getLogger("optimum").setLevel(logging.ERROR)


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _const(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def shape_chain_graph() -> onnx.ModelProto:
    """x (B, S, 12) -> Reshape to (B, S, 3, 4) by a Shape/Gather/Concat chain, Expand over a
    new axis by another chain, a whole-tensor Slice; two identical Mul nodes; a dead branch."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "i0"], ["b"], axis=0),
        helper.make_node("Gather", ["shape", "i1"], ["s"], axis=0),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["b1"]),
        helper.make_node("Unsqueeze", ["s", "ax0"], ["s1"]),
        helper.make_node("Concat", ["b1", "s1", "heads"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["split"]),  # (B, S, 3, 4)
        helper.make_node("Unsqueeze", ["split", "ax2"], ["split5"]),  # (B, S, 1, 3, 4)
        helper.make_node("Concat", ["b1", "s1", "two", "heads"], ["expand_to"], axis=0),
        helper.make_node("Expand", ["split5", "expand_to"], ["wide"]),  # (B, S, 2, 3, 4)
        helper.make_node("Shape", ["wide"], ["wide_shape"]),
        helper.make_node("Gather", ["wide_shape", "i1"], ["s_again"], axis=0),
        helper.make_node("Unsqueeze", ["s_again", "ax0"], ["s_end"]),
        helper.make_node("Slice", ["wide", "zero", "s_end", "ax1", "one"], ["sliced"]),
        helper.make_node("Mul", ["sliced", "sliced"], ["sq1"]),
        helper.make_node("Mul", ["sliced", "sliced"], ["sq2"]),
        helper.make_node("Add", ["sq1", "sq2"], ["y"]),
        helper.make_node("Neg", ["x"], ["unused"]),
    ]
    inits = [_const("i0", 0), _const("i1", 1), _const("ax0", [0]), _const("ax1", [1]),
             _const("ax2", [2]), _const("heads", [3, 4]), _const("two", [2]),
             _const("zero", [0]), _const("one", [1])]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def test_targets():
    assert reshape_target(["B", "S", 576], ["B", "S", 9, 64]) == [0, 0, 9, 64]
    assert reshape_target(["B", 3, 3, "T", 64], ["B", 9, "T", 64]) == [0, 9, -1, 64]
    assert reshape_target(["B", "S", 9, 64], ["B", "S", 576]) == [0, 0, 576]
    assert reshape_target(["B", "S", 4], ["S", "B", 4]) is None  # two unknowns
    assert expand_target(["B", 3, 1, "T", 64], ["B", 3, 3, "T", 64]) == [1, 1, 3, 1, 1]
    assert expand_target([1, "T"], ["B", "T"]) is None  # a symbolic broadcast


def test_shape_chains_become_constants_with_the_same_numbers():
    original = shape_chain_graph()
    simplified = simplify(shape_chain_graph(), fuse=False)
    counts = op_counts(simplified)
    assert counts["Shape"] == counts["Gather"] == counts["Concat"] == counts["Slice"] == 0
    assert counts["Mul"] == 1 and counts["Neg"] == 0
    rng = np.random.default_rng(0)
    for batch, seq in [(1, 1), (2, 5), (3, 7)]:
        x = rng.standard_normal((batch, seq, 12)).astype(np.float32)
        expected, = run(original, {"x": x})
        got, = run(simplified, {"x": x})
        assert got.shape == (batch, seq, 2, 3, 4)
        np.testing.assert_array_equal(got, expected)


def test_merge_common_keeps_outputs_and_dead_nodes_go():
    model = shape_chain_graph()
    graph = model.graph
    assert merge_common(graph) >= 1  # the second Mul (and one of the equal Unsqueezes)
    assert remove_unused(graph) >= 1  # Neg
    assert {o.name for o in graph.output} == {"y"}
    assert "unused" not in {o for node in graph.node for o in node.output}


def test_reversing_slice_is_not_dropped():
    """A Slice with step -1 keeps its input's shape but not its values."""
    nodes = [helper.make_node("Slice", ["x", "start", "end", "axis", "step"], ["y"])]
    inits = [_const("start", [-1]), _const("end", [-(2**62)]), _const("axis", [1]),
             _const("step", [-1])]
    graph = helper.make_graph(
        nodes, "rev", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    simplified = simplify(model, fuse=False)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(run(simplified, {"x": x})[0], x[:, ::-1])


@pytest.fixture(scope="module")
def llama():
    return elastic(tiny_llama, char_tokenizer())


def _padded_feed(session, ids: np.ndarray, mask: np.ndarray, past=None):
    feed = {"input_ids": ids, "attention_mask": mask}
    total = mask.shape[1]
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)[:, total - ids.shape[1]:]
    names = {i.name: i for i in session.get_inputs()}
    if "position_ids" in names:
        feed["position_ids"] = positions
    for name, info in names.items():
        if name.startswith("past_key_values."):
            empty = np.zeros((ids.shape[0], info.shape[1], 0, info.shape[3]), np.float32)
            feed[name] = empty if past is None else past[name.replace("past_key_values.",
                                                                       "present.")]
    return feed, positions


def sibling_graph(opset: int) -> onnx.ModelProto:
    """x (B, S, 6) read by three MatMuls with their own weights and by one whose weight a
    second MatMul also reads (tied: must stay as it is)."""
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal((6, n)).astype(np.float32)
               for name, n in (("wq", 4), ("wk", 2), ("wv", 3), ("tied", 5))}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="/attn/q_proj/MatMul"),
             helper.make_node("Relu", ["x"], ["rx"]),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="/attn/k_proj/MatMul"),
             helper.make_node("Add", ["k", "k"], ["k2"]),  # a consumer between the siblings
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="/attn/v_proj/MatMul"),
             helper.make_node("MatMul", ["x", "tied"], ["t1"], name="/head/MatMul"),
             helper.make_node("MatMul", ["rx", "tied"], ["t2"], name="/head/MatMul_1")]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", "S", n])
               for name, n in (("q", 4), ("k2", 2), ("v", 3), ("t1", 5), ("t2", 5))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 6])
    graph = helper.make_graph(nodes, "siblings", [x], outputs,
                              [numpy_helper.from_array(w, n) for n, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("opset", [11, 18])  # Split's sizes: an attribute before 13, an input
def test_sibling_matmuls_become_one_with_the_same_numbers(opset):
    model = sibling_graph(opset)
    x = np.random.default_rng(1).standard_normal((2, 3, 6)).astype(np.float32)
    before = run(model, {"x": x})
    assert fuse_sibling_matmuls(model) == 2  # q, k, v -> one; the tied pair untouched
    counts = op_counts(model)
    assert counts["MatMul"] == 3 and counts["Split"] == 1
    fused = next(n for n in model.graph.node if n.op_type == "MatMul" and "tied" not in n.input)
    assert fused.name == "/attn/SiblingMatMul"
    assert {i.name for i in model.graph.initializer} == {"tied", "/attn/SiblingMatMul/weight"} | (
        {"/attn/SiblingMatMul/split"} if opset >= 13 else set())
    onnx.checker.check_model(model)
    for got, want in zip(run(model, {"x": x}), before, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert fuse_sibling_matmuls(model) == 0  # nothing left to fuse


def test_simplified_decoder_matches_pytorch_on_a_left_padded_batch(llama, tmp_path):
    manifest = export(llama, tmp_path, budgets=[0.5])
    graph = tmp_path / manifest["budgets"][0]["graph"]
    model = onnx.load(str(graph))
    in_blocks = [n for n in model.graph.node if n.name.startswith("/model/layers.")]
    assert not [n for n in in_blocks if n.op_type == "Shape"]  # no shape chain left
    layers = llama.model.config.num_hidden_layers
    assert op_counts(model)["GroupQueryAttention"] == layers  # one fused node per block
    tables = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
              if i.name in ("cos_cache", "sin_cache")}
    rows = max(llama.model.config.max_position_embeddings, MIN_ROTARY_POSITIONS)
    cos, _ = llama.model.model.rotary_emb(torch.zeros(1), torch.arange(rows)[None])
    half = cos.shape[-1] // 2
    np.testing.assert_array_equal(tables["cos_cache"], cos[0, :, :half].numpy())  # PyTorch's
    plain = export(llama, tmp_path / "plain", budgets=[0.5],
                   config=OnnxExportConfig(simplify=False))["budgets"][0]
    unsimplified = onnx.load(str(tmp_path / "plain" / plain["graph"]), load_external_data=False)
    assert len(model.graph.node) < len(unsimplified.graph.node) / 2
    unfused = export(llama, tmp_path / "unfused", budgets=[0.5],
                     config=OnnxExportConfig(fuse_siblings=False))["budgets"][0]
    unfused = onnx.load(str(tmp_path / "unfused" / unfused["graph"]), load_external_data=False)
    # per block the first MatMuls of q/k/v and of gate/up read one input: 5 -> 2
    assert op_counts(unfused)["MatMul"] - op_counts(model)["MatMul"] == 3 * layers
    assert op_counts(model)["Split"] == 2 * layers
    # the cached length comes from the mask: the cache is read by GroupQueryAttention alone
    assert not [n for n in model.graph.node
                if n.op_type == "Shape" and n.input[0].startswith("past_key_values.")]
    assert kv_cache_in_place(model.graph) and manifest["budgets"][0]["kv_cache_in_place"]
    assert not kv_cache_in_place(unsimplified.graph)  # its Concats read the cache

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 60, (3, 7)).astype(np.int64)
    mask = np.ones((3, 7), np.int64)
    mask[1, :2] = 0  # left padding, as batched generation pads
    mask[2, :5] = 0
    feed, positions = _padded_feed(session, ids, mask)
    out = dict(zip(names, session.run(None, feed), strict=True))
    step_ids = rng.integers(3, 60, (3, 1)).astype(np.int64)
    step_mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
    step_feed, step_positions = _padded_feed(session, step_ids, step_mask, out)
    step = dict(zip(names, session.run(None, step_feed), strict=True))
    with at_budget(llama, 0.5) as torch_model, torch.no_grad():
        ref = torch_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          position_ids=torch.from_numpy(positions), use_cache=True)
        ref_step = torch_model(input_ids=torch.from_numpy(step_ids),
                               attention_mask=torch.from_numpy(step_mask),
                               position_ids=torch.from_numpy(step_positions),
                               past_key_values=ref.past_key_values)
    real = mask.astype(bool)
    np.testing.assert_allclose(out["logits"][real], ref.logits.numpy()[real], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(step["logits"], ref_step.logits.numpy(), atol=1e-4, rtol=1e-4)
    assert step["present.0.key"].shape[2] == 8
    # the same two calls with the cache in one preallocated buffer, updated in place
    in_place = CacheDecoder(session, in_place=True, capacity=16)
    np.testing.assert_allclose(in_place(ids, mask, positions)[real], out["logits"][real],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(in_place(step_ids, step_mask, step_positions), step["logits"],
                               atol=1e-5, rtol=1e-5)
    key = in_place.buffers["past_key_values.0.key"]
    assert key.shape[2] == 16
    np.testing.assert_allclose(key[:, :, :8], step["present.0.key"], atol=1e-6, rtol=1e-6)
