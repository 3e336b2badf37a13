"""flexrank.compress.quality: the int8 fake quantization against onnxruntime running the
graph its own quantize_dynamic wrote (as exporters/onnx/convert.py calls it), and the
remembering 4-bit spec against H3's plain one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from flexrank.compress.quality import (
    export_spec,
    fake_quantize_int8_per_channel,
    fake_quantize_uint8_tensor,
)


def test_int8_equals_onnxruntimes_dynamic_quantization(tmp_path):
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    k, n = 64, 48
    weight = rng.standard_normal((k, n)).astype(np.float32)  # MatMul's B: (K, N)
    weight[:, 3] *= 20  # channels of very different ranges: per-channel scales matter
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(tmp_path / "f.onnx", tmp_path / "q.onnx", op_types_to_quantize=["MatMul"],
                     per_channel=True, weight_type=QuantType.QInt8)
    x = (rng.standard_normal((10, k)) * 3 + 0.5).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "q.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    w = torch.from_numpy(weight.T.copy())  # a torch Linear weight: (out, in)
    ours = fake_quantize_uint8_tensor(torch.from_numpy(x)) @ fake_quantize_int8_per_channel(w).T
    exact = torch.from_numpy(x) @ w.T
    err_ours = float((ours - torch.from_numpy(got)).abs().max())
    err_float = float((exact - torch.from_numpy(got)).abs().max())
    # onnxruntime's int32 accumulation then one float rescale: equal up to float rounding,
    # far closer than the float product is
    assert err_ours <= 1e-4 * float(exact.abs().max()), (err_ours, err_float)
    assert err_float > 100 * err_ours


def test_uint8_activation_range_holds_zero():
    x = torch.tensor([[0.5, 1.0, 2.0]])  # all positive: the range is widened to [0, 2]
    q = fake_quantize_uint8_tensor(x)
    assert float(q.min()) >= 0 and torch.allclose(q, x, atol=2.0 / 255)


@pytest.mark.parametrize("precision", ["int4", "8da4w"])
def test_remembering_spec_quantizes_as_the_plain_one(precision):
    from flexrank.compress.qat import QuantSpec

    weight = torch.nn.Parameter(torch.randn(64, 96), requires_grad=False)
    spec = export_spec(precision)
    plain = QuantSpec(precision, block_size=32,
                      **({"embedding_bits": 4} if precision == "int4" else {}))
    with torch.no_grad():
        first = spec.weight(weight)
        assert spec.weight(weight) is first  # remembered
        assert torch.equal(first, plain.weight(weight))
        weight.mul_(2)  # an in-place change is seen (the tensor's version moves)
        assert torch.equal(spec.weight(weight), plain.weight(weight))
