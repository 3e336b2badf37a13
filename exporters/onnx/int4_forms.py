"""int4: each low-rank layer's deployment form chosen by its measured output error.

A layer at rank r can ship as one dense MatMul (m·n weights), plain factors (r(m+n)) or
gauge-fixed factors (r(m+n−r), DESIGN.md §4.6). Under 4-bit weights the forms differ in
error as well as size: gauge fixing multiplies the error of z = V̂ᵀx by about cond(U[:r]) in
the rebuilt rows (`forms.quantized_policy`), and a dense product of the factors quantizes
differently from the factors themselves. So, per layer: quantize every form's weights with
the export's own quantizer (`int4.quantized_graph`, one graph for all of them), decode
them (`int4.dequantized`), run each form on calibration inputs of the layer in float64, and
keep the cheapest form whose relative output error ‖ŷ − y‖/‖y‖ (y: the float layer at
rank r) is within `OnnxExportConfig.int4_form_slack` of the best form's. The rule and
the inputs are shared with ExecuTorch 8da4w (`exporters/common/form_choice.py`).
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from flexrank.compress.select import nested_layers
from flexrank.exporters.common.form_choice import (
    cheapest_within,
    float_output,
    form_modules,
    layer_inputs,
    low_rank_layers,
    relative_error,
)
from flexrank.exporters.common.forms import DenseLinear, FactorLinear, GaugeLinear
from flexrank.exporters.onnx.int4 import dequantized, quantized_graph
from flexrank.formats import ONNX_IR_VERSION

# {module type: [(parameter, stored transposed as the MatMul's B (K, N))]}
_MATMUL_WEIGHTS = {DenseLinear: [("weight", True)],
                   GaugeLinear: [("V_hat_t", True), ("U_rest", True)],
                   FactorLinear: [("Vt", True), ("Ut", False)]}


def quantized_weights(arrays: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """{name: (K, N) float64} each float32 weight as the export's quantizer stores it
    (`config`'s block size and symmetry; its algorithm when RTN or HQQ, else RTN), decoded."""
    nodes, inputs, outputs, inits = [], [], [], []
    for i, (name, array) in enumerate(arrays.items()):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), f"w{i}"))
        k, n = array.shape
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, k]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, n]))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [name], name=f"m{i}"))
    model = helper.make_model(helper.make_graph(nodes, "weights", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = ONNX_IR_VERSION
    algorithm = config.int4_algorithm if config.int4_algorithm in ("rtn", "hqq") else "rtn"
    quantized = quantized_graph(model, algorithm, config.int4_block_size, 4,
                                config.int4_symmetric)
    tensors = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    return {node.output[0]: dequantized(node, tensors) for node in quantized.graph.node
            if node.op_type == "MatMulNBits"}


@torch.no_grad()
def choose_forms(model, ranks: dict[str, int], batches, config) -> dict[str, dict]:
    """{layer: {"form", "errors": {form: relative output error}, "params": {form: weights}}}
    for every nested linear layer below full rank (module docstring)."""
    inputs = layer_inputs(model, ranks, batches)
    candidates, arrays = {}, {}
    for name, (layer, rank) in low_rank_layers(model, ranks, inputs).items():
        candidates[name] = form_modules(name, layer, rank)
        for form, (module, _) in candidates[name].items():
            for param, transposed in _MATMUL_WEIGHTS[type(module)]:
                value = getattr(module, param).detach().numpy()
                arrays[f"{name}|{form}|{param}"] = value.T if transposed else value
    decoded = quantized_weights(arrays, config) if arrays else {}
    chosen = {}
    for name, forms in candidates.items():
        layer, x = nested_layers(model)[name], inputs[name]
        reference = float_output(layer, ranks.get(name, layer.max_rank), x)
        errors, params = {}, {}
        for form, (module, record) in forms.items():
            for param, transposed in _MATMUL_WEIGHTS[type(module)]:
                value = torch.from_numpy(decoded[f"{name}|{form}|{param}"])
                getattr(module, param).data = value.T if transposed else value
            errors[form] = relative_error(module(x), reference)
            params[form] = record.params
        form = cheapest_within(errors, params, config.int4_form_slack)
        chosen[name] = {"form": form, "errors": errors, "params": params}
    return chosen
