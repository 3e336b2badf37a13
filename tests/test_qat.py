"""Fake quantization (flexrank/compress/qat.py) against the quantizers and runtimes that
ship the weights: onnxruntime's MatMulNBitsQuantizer (through the exporter's own
`quantize_int4`) and its MatMulNBits kernel; torchao's 8da4w quantization; the exporters'
form rule; and quantization-aware distillation against plain distillation, both measured
after quantization."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from flexrank.compress.layers import NestedLinear
from flexrank.compress.qat import (
    DENSE_FRACTION,
    QuantSpec,
    deployed_form,
    fake_quantize_8da4w,
    fake_quantize_blockwise,
    fake_quantize_int4,
    fake_quantize_int8_blocks,
    fake_quantized,
    quantized_copy,
)
from flexrank.exporters.common.gauge import DENSE_FRACTION as EXPORT_DENSE_FRACTION
from flexrank.exporters.common.gauge import LayerForm, choose_form
from flexrank.runtime.kv_cache import make_session


def matmul_graph(weight: np.ndarray, path) -> None:
    """y = x @ B with B = weightᵀ (K = in, N = out), a constant initializer."""
    k, n = weight.shape[1], weight.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))


def ort_quantize(path, bits: int = 4, symmetric: bool = True, accuracy_level: int = 0):
    """onnxruntime's RTN MatMulNBitsQuantizer with the exporter's settings (block 32,
    exporters/onnx: DefaultWeightOnlyQuantConfig), in place; returns {name: array}."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=32, bits=bits, is_symmetric=symmetric,
                                          accuracy_level=accuracy_level)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), bits=bits, block_size=32,
                                     is_symmetric=symmetric, algo_config=config)
    quantizer.process()
    onnx.save(quantizer.model.model, str(path))
    graph = quantizer.model.model.graph
    (node,) = [n for n in graph.node if n.op_type == "MatMulNBits"]
    return node, {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def decoded_weight(node, inits) -> np.ndarray:
    """(N, K) float32 weight of a MatMulNBits node from its initialisers, by the contrib
    op's formula: (code − zero) · scale per block of K, 4-bit codes low nibble first."""
    attrs = {a.name: a.i for a in node.attribute}
    k, n, block, bits = attrs["K"], attrs["N"], attrs["block_size"], attrs["bits"]
    blocks = -(-k // block)
    packed = inits[node.input[1]].reshape(n, -1)
    codes = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, -1) if bits == 4 else packed
    codes = codes.reshape(n, blocks, block).astype(np.float32)
    scales = inits[node.input[2]].reshape(n, blocks, 1)
    zero = np.full((n, blocks, 1), 2.0 ** (bits - 1), np.float32)
    if len(node.input) > 3 and node.input[3]:
        stored = inits[node.input[3]].reshape(n, -1)
        if bits == 4:
            stored = np.stack([stored & 0x0F, stored >> 4], -1).reshape(n, -1)
        zero = stored[:, :blocks].astype(np.float32).reshape(n, blocks, 1)
    return ((codes - zero) * scales).reshape(n, -1)[:, :k]


def hard_weight(out: int, k: int, seed: int = 0) -> np.ndarray:
    """Random weights with the cases a rounding rule can get wrong: an all-zero block,
    exact halves of a step (ties), a block of one sign, the largest magnitude negative."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, k)).astype(np.float32)
    w[0, :32] = 0.0
    w[1, :32] = np.arange(32, dtype=np.float32) / 4 - 4  # codes land on .5 exactly
    w[2, :32] = np.abs(w[2, :32])
    w[3, :32] = -np.abs(w[3, :32])
    return w


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [96, 80])  # 80: a last block of 16, padded by the quantizer
def test_blockwise_equals_what_onnxruntime_stores_and_computes(tmp_path, bits, symmetric, k):
    weight = hard_weight(24, k)
    path = tmp_path / "mm.onnx"
    matmul_graph(weight, path)
    node, inits = ort_quantize(path, bits, symmetric)
    stored = decoded_weight(node, inits)  # (N, K) = (out, in)
    ours = fake_quantize_blockwise(torch.from_numpy(weight), bits, 32, symmetric).numpy()
    assert np.array_equal(ours, stored)  # bit for bit, ties and padding included
    assert not np.array_equal(ours, weight)
    if bits == 4:
        assert torch.equal(fake_quantize_int4(torch.from_numpy(weight), 32, symmetric),
                           torch.from_numpy(ours))

    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    got = make_session(path, 1).run(["y"], {"x": x})[0]
    reference = x.astype(np.float64) @ ours.T.astype(np.float64)
    assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max()


def test_int4_accuracy_level_4_quantizes_activations_in_int8_blocks(tmp_path):
    weight = hard_weight(64, 128, seed=3)
    path = tmp_path / "mm.onnx"
    matmul_graph(weight, path)
    ort_quantize(path, accuracy_level=4)
    x = np.random.default_rng(2).standard_normal((7, 128)).astype(np.float32)
    x[:, 5] *= 30  # one outlier channel: its block's other entries lose precision
    got = make_session(path, 1).run(["y"], {"x": x})[0].astype(np.float64)
    w = fake_quantize_int4(torch.from_numpy(weight)).double()
    xt = torch.from_numpy(x)
    float_activations = (xt.double() @ w.T).numpy()
    int8_activations = (fake_quantize_int8_blocks(xt, 32).double() @ w.T).numpy()
    emulated = np.abs(got - int8_activations).max()
    ignored = np.abs(got - float_activations).max()
    # the int8 emulation removes nearly all the activation error (ties may round apart)
    assert emulated < 0.05 * ignored, (emulated, ignored)


@pytest.mark.parametrize("scales", ["hqq_bf16", "absmax"])
def test_8da4w_equals_torchao_quantized_linear(scales):
    """Against torchao's own quantization of an nn.Linear: "hqq_bf16" with the exporter's
    config (exporters/executorch/quant.py: HQQ scale-only, bfloat16 scales), "absmax" with
    torchao's defaults."""
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, quantize_

    options = {"weight_scale_dtype": torch.bfloat16,
               "intx_choose_qparams_algorithm": "hqq_scale_only"} if scales == "hqq_bf16" else {}
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48, bias=True)
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        ours = QuantSpec("8da4w", 32, scales=scales).linear(x, linear.weight, linear.bias)
        our_weight = fake_quantize_8da4w(linear.weight, 32, scales)
        floats = linear(x)
        quantize_(linear, Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(32), **options))
        if linear.weight.scale.dtype == torch.bfloat16:  # the exporter holds them as float32
            linear.weight.scale = linear.weight.scale.float()
        theirs = linear(x)
        their_weight = linear.weight.dequantize()
    assert torch.allclose(our_weight, their_weight, rtol=1e-6, atol=1e-7)
    scale = float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) <= 1e-5 * scale
    assert float((floats - theirs).abs().max()) > 1e-3 * scale  # quantization is visible


def test_int4_passes_gradients_straight_through():
    w = torch.randn(16, 64, requires_grad=True)
    upstream = torch.randn(16, 64)
    (fake_quantize_int4(w, 32) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_8da4w_forward_and_gradients_equal_torchaos_qat():
    """Our 8da4w linear against torchao's own QAT (`QATConfig(..., step="prepare")` on an
    nn.Linear): same outputs, same gradients for the weight and the input."""
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, quantize_

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48, bias=True)
    weight = linear.weight.detach().clone().requires_grad_(True)
    x = torch.randn(3, 5, 128, requires_grad=True)
    upstream = torch.randn(3, 5, 48)
    spec = QuantSpec("8da4w", 32, scales="absmax")  # torchao QAT's own scales
    (spec.linear(x, weight, linear.bias) * upstream).sum().backward()
    ours = (x.grad.clone(), weight.grad.clone())
    x.grad = None
    base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                 weight_granularity=PerGroup(32))
    prepared = torch.nn.Sequential(linear)  # quantize_ swaps children
    quantize_(prepared, QATConfig(base, step="prepare"))
    assert type(prepared[0]).__name__ == "FakeQuantizedLinear"
    out = prepared(x)
    (out * upstream).sum().backward()
    with torch.no_grad():
        again = spec.linear(x, weight, linear.bias)
        plain = torch.nn.functional.linear(x, weight, linear.bias)
    assert torch.allclose(again, out, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(plain, out, rtol=1e-3, atol=1e-3)
    assert torch.allclose(ours[0], x.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours[1], prepared[0].weight.grad, rtol=1e-5, atol=1e-6)


def test_deployed_form_is_the_exporters_rule_without_gauge_fixing():
    assert DENSE_FRACTION == EXPORT_DENSE_FRACTION
    for m, n in ((64, 64), (128, 48), (48, 200)):
        for rank in range(1, min(m, n) + 1):
            expected = choose_form(m, n, rank, None)  # no condition: never gauge-fixed
            assert expected in (LayerForm.DENSE, LayerForm.PLAIN)
            assert deployed_form(m, n, rank) == expected.value, (m, n, rank)


def test_nested_prefix_of_quantized_factors_is_quantized_prefix():
    """Blocks run along the rank within Uᵣ and along n within each row of Vᵣᵀ: at ranks
    that are block multiples, quantizing the full factors then slicing is the same."""
    torch.manual_seed(0)
    U, V = torch.randn(96, 128), torch.randn(80, 128)
    for r in (32, 64, 96):
        assert torch.equal(fake_quantize_int4(U)[:, :r], fake_quantize_int4(U[:, :r]))
        assert torch.equal(fake_quantize_int4(V.T)[:r], fake_quantize_int4(V[:, :r].T))


def test_context_restores_the_float_forward_and_copy_leaves_the_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(NestedLinear(64, 96, 64, bias=True), torch.nn.Linear(96, 32))
    for p in model.parameters():
        torch.nn.init.normal_(p)
    model[0].rank = 32
    x = torch.randn(4, 64)
    with torch.no_grad():
        before = model(x)
        copied = quantized_copy(model, "int4", activations=False)
        with fake_quantized(model, QuantSpec("int4", activations=False, embedding_bits=32)):
            inside = model(x)
        after = model(x)
        # by hand: plain factors (32 < 0.9·64·96/160), each MatMul weight quantized
        U, V = model[0].U[:, :32], model[0].V[:, :32]
        z = x @ fake_quantize_int4(V.T).T
        hidden = z @ fake_quantize_int4(U).T + model[0].bias
        by_hand = hidden @ fake_quantize_int4(model[1].weight).T + model[1].bias
    assert torch.equal(after, before)
    assert torch.allclose(inside, by_hand, atol=1e-5, rtol=1e-5)
    assert torch.allclose(copied(x), by_hand, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(inside, before, atol=1e-2)


def test_fake_quantized_model_equals_the_exported_int4_graph(tmp_path):
    """The whole tiny Llama at β = 0.4 (plain factors and dense layers, ranks rounded to
    the block, fused sibling MatMuls, the tied table in 4 bits): onnxruntime's logits for
    the exported int4 graph (accuracy level 0: float activations) equal PyTorch's with
    `quantized_copy`, to float rounding; the float model is far from both."""
    from conftest import char_tokenizer, token_batches
    from elastic_fixtures import nested_plan
    from test_int4 import HELD_OUT, int4_llama, onnx_logits

    from flexrank.compress.covariance import collect_covariances
    from flexrank.compress.elastic import ElasticModel
    from flexrank.compress.surgery import factorize_
    from flexrank.exporters import export
    from flexrank.exporters.onnx.convert import OnnxExportConfig

    model = int4_llama(init_std=0.2)
    factorize_(model, collect_covariances(model, token_batches(100), progress=False),
               progress=False)
    elastic = ElasticModel(model, nested_plan(model, (0.4, 1.0)),
                           tokenizer=char_tokenizer(), model_id="qat_llama")
    manifest = export(elastic, tmp_path, budgets=[0.4], quantize="int4",
                      config=OnnxExportConfig(int4_accuracy_level=0))
    entry = manifest["budgets"][0]
    assert {x["form"] for x in entry["layers"]} == {"plain", "dense"}
    assert entry["ranks"] != elastic.layer_ranks(0.4)  # some were rounded to the block
    got = onnx_logits(tmp_path / entry["graph"], HELD_OUT)
    elastic.set_budget(0.4)  # the plan's ranks: the copy rounds them as the export does
    spec = {"activations": False,
            "embedding_bits": entry["quantization"].get("embedding_bits", 32)}
    with torch.no_grad():
        ours = quantized_copy(model, "int4", **spec)(input_ids=HELD_OUT).logits.numpy()
        floats = model(input_ids=HELD_OUT).logits.numpy()
    scale = float(np.abs(ours).max())
    assert np.abs(got - ours).max() <= 1e-4 * scale
    assert np.abs(got - floats).max() > 0.1 * scale


def test_fake_quantized_model_equals_the_exported_8da4w_model():
    """The tiny Llama at β = 0.4 and 1 (plain and dense layers, ranks rounded to the group,
    the lm_head and the 8-bit embedding): `quantized_copy(model, "8da4w")` equals the model
    the ExecuTorch exporter lowers (deployable_model → linear_forms_ → quantize_8da4w_, in
    eager PyTorch); the float model is far from both."""
    from conftest import char_tokenizer, token_batches
    from elastic_fixtures import nested_plan
    from test_int4 import HELD_OUT, int4_llama

    from flexrank.compress.covariance import collect_covariances
    from flexrank.compress.elastic import ElasticModel
    from flexrank.compress.surgery import factorize_
    from flexrank.exporters.common.forms import FormPolicy, deployable_model, quantized_policy
    from flexrank.exporters.executorch.export import exported_ranks
    from flexrank.exporters.executorch.quant import linear_forms_, quantize_8da4w_

    model = int4_llama(init_std=0.2)
    factorize_(model, collect_covariances(model, token_batches(100), progress=False),
               progress=False)
    elastic = ElasticModel(model, nested_plan(model, (0.4, 1.0)), tokenizer=char_tokenizer(),
                           model_id="qat_llama")
    for beta in (0.4, 1.0):
        ranks = exported_ranks(elastic, beta, "8da4w", 32)
        deployed, records = deployable_model(model, ranks, policy=quantized_policy(FormPolicy()))
        linear_forms_(deployed)
        report = quantize_8da4w_(deployed, list(ranks), 32)
        assert not report.skipped and "lm_head" in report.quantized
        elastic.set_budget(beta)  # the plan's ranks: the copy rounds them as the export does
        with torch.no_grad():
            theirs = deployed(input_ids=HELD_OUT).logits
            ours = quantized_copy(model, "8da4w")(input_ids=HELD_OUT).logits
            floats = model(input_ids=HELD_OUT).logits
        scale = float(theirs.abs().max())
        assert float((ours - theirs).abs().max()) <= 1e-5 * scale, beta
        assert float((floats - theirs).abs().max()) > 0.1 * scale


@pytest.mark.slow
def test_qat_distillation_beats_plain_distillation_after_int4_quantization():
    """The same tiny factorised Llama, plan, data, seed and steps, distilled without and
    with `DistillConfig(qat="int4")`; held-out KL to the float teacher with the int4
    weights each would ship (`fake_quantized`, equal to the exported graph: see above).
    QAT must be lower there at the trained budgets below full rank, and, as the price,
    not lower in float (it trains for the quantized weights, not the float ones)."""
    import copy

    from conftest import token_batches
    from elastic_fixtures import nested_plan
    from test_int4 import int4_llama

    from flexrank.compress.config import DistillConfig
    from flexrank.compress.covariance import collect_covariances
    from flexrank.compress.distill import distill, evaluate_budgets
    from flexrank.compress.elastic import ElasticModel
    from flexrank.compress.surgery import factorize_

    teacher = int4_llama(init_std=0.05)
    train = token_batches(100, num=8, batch=8, seq=32, seed=0)
    held_out = token_batches(100, num=2, batch=8, seq=32, seed=9)
    start = copy.deepcopy(teacher)
    factorize_(start, collect_covariances(start, train, progress=False), progress=False)
    plan = nested_plan(start, (0.5, 0.75, 1.0))
    kl = {}
    for qat in (None, "int4"):
        student = copy.deepcopy(start)
        config = DistillConfig(steps=40, lr=3e-4, warmup_steps=5, batch_size=8, qat=qat,
                               checkpoint_every=0, seed=0)
        distill(student, teacher, plan, train, config, progress=False)
        elastic = ElasticModel(student, plan)
        floats = evaluate_budgets(elastic, teacher, held_out)
        with fake_quantized(student, "int4"):
            quantized = evaluate_budgets(elastic, teacher, held_out)
        kl[qat] = {beta: (floats[beta]["kl"], quantized[beta]["kl"]) for beta in (0.5, 0.75)}
    for beta in (0.5, 0.75):
        (float_plain, int4_plain), (float_qat, int4_qat) = kl[None][beta], kl["int4"][beta]
        assert int4_qat < 0.97 * int4_plain, (beta, kl)
        assert float_plain < float_qat, (beta, kl)


@pytest.mark.slow
def test_cli_compress_qat_records_it_in_the_checkpoint(tmp_path, capsys):
    from conftest import char_tokenizer, tiny_llama

    from flexrank.cli import main
    from flexrank.compress.elastic import ElasticModel

    tiny_llama(init_std=0.2).save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("".join(f"{i} the quick brown fox jumps over the lazy dog\n"
                            for i in range(400)))
    args = ["compress", str(tmp_path / "model"), "--calib", str(text), "--samples", "8",
            "--seq-len", "32", "--eval-samples", "2", "--budgets", "1,0.7", "--levels", "4",
            "--probe-samples", "2", "--steps", "2"]
    assert main([*args, "-o", str(tmp_path / "q"), "--qat", "int4"]) == 0
    assert ElasticModel.from_pretrained(tmp_path / "q" / "elastic").qat == \
        {"scheme": "int4", "block_size": 32}
    assert main([*args, "-o", str(tmp_path / "bad"), "--qat", "int4",
                 "--qat-block-size", "256"]) == 2
    assert "qat_block_size 256" in capsys.readouterr().err


def test_compress_signature_names_qat_only_when_set():
    """Folders compressed before QAT existed keep their signature (they resume); a QAT run
    differs from a float one in the distill stage's settings."""
    from flexrank.compress.config import CompressConfig, DistillConfig

    plain = CompressConfig().signature("m")["distill"]
    assert "qat" not in plain and "qat_block_size" not in plain
    qat = CompressConfig(distill=DistillConfig(qat="int4")).signature("m")["distill"]
    assert qat["qat"] == "int4" and qat["qat_block_size"] == 32
    with pytest.raises(ValueError, match="qat_block_size 16 does not fit qat '8da4w'"):
        DistillConfig(qat="8da4w", qat_block_size=16)
    with pytest.raises(ValueError, match="qat 'int2' is not one of"):
        DistillConfig(qat="int2")


def test_cli_full_budget_is_trained_under_qat_and_anchored_otherwise():
    """`--full-budget auto`: an anchored β = 1 is refit to the original weights in float,
    which would undo QAT's training of β = 1 for its 4-bit weights; so auto trains it under
    --qat and anchors it otherwise; an explicit choice wins. The probe flags reach the
    config."""
    import argparse

    from flexrank.cli.compress import add_compress_args, compress_config

    parser = argparse.ArgumentParser()
    add_compress_args(parser)
    base = []
    parse = parser.parse_args
    assert compress_config(parse(base)).distill.full_budget == "anchor"
    assert compress_config(parse([*base, "--qat", "int4"])).distill.full_budget == "train"
    assert compress_config(parse([*base, "--qat", "8da4w", "--full-budget", "anchor"])
                           ).distill.full_budget == "anchor"
    probe = compress_config(parse([*base, "--probe-points", "2", "--probe-top-k", "256"])).probe
    assert (probe.probe_points, probe.top_k) == (2, 256)


def test_export_warns_when_it_ships_other_weights_than_qat_trained_for():
    """A QAT checkpoint exported with another scheme, block size or int4 algorithm (or in
    float) loses what QAT trained for: the export says so, naming the fix; a matching
    export and a checkpoint without QAT say nothing."""
    from flexrank.exporters import qat_mismatch
    from flexrank.exporters.executorch.export import ExecutorchExportConfig
    from flexrank.exporters.onnx.convert import OnnxExportConfig

    int4 = {"scheme": "int4", "block_size": 32}
    assert qat_mismatch(None, "int4") is None
    assert qat_mismatch(int4, "int4") is None
    assert qat_mismatch(int4, "int4", OnnxExportConfig(int4_block_size=32)) is None
    assert "ships float weights: --quantize int4" in qat_mismatch(int4, None)
    assert "ships 8da4w weights: --quantize int4" in qat_mismatch(int4, "8da4w")
    assert "blocks of 64: --block-size 32" in qat_mismatch(
        int4, "int4", OnnxExportConfig(int4_block_size=64))
    assert "with hqq: --int4-algo rtn" in qat_mismatch(
        int4, "int4", OnnxExportConfig(int4_algorithm="hqq"))
    w8da4w = {"scheme": "8da4w", "block_size": 64}
    assert "ExecutorchExportConfig(group_size=64)" in qat_mismatch(w8da4w, "8da4w")
    assert qat_mismatch(w8da4w, "8da4w", ExecutorchExportConfig(group_size=64)) is None
