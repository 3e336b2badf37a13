"""int4: each low-rank layer's deployment form chosen by its measured output error.

A layer at rank r can ship as one dense MatMul (m·n weights), plain factors (r(m+n)) or
gauge-fixed factors (r(m+n−r), DESIGN.md §4.6). Under 4-bit weights the forms differ in
error as well as size: gauge fixing multiplies the error of z = V̂ᵀx by about cond(U[:r]) in
the rebuilt rows (`forms.quantized_policy`), and a dense product of the factors quantizes
differently from the factors themselves. So, per layer: quantize every form's weights with
the export's own quantizer (`int4.quantized_graph`, one graph for all of them), decode
them (`int4.dequantized`), run each form on calibration inputs of the layer in float64, and
keep the cheapest form whose relative output error ‖ŷ − y‖/‖y‖ (y: the float layer at
rank r) is within `OnnxExportConfig.int4_form_slack` of the best form's.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from flexrank.compress.layers import NestedLinear
from flexrank.compress.select import nested_layers
from flexrank.exporters.common.forms import (
    DenseLinear,
    FactorLinear,
    FormPolicy,
    GaugeLinear,
    deploy_layer,
)
from flexrank.exporters.executorch.validate import at_ranks
from flexrank.exporters.onnx.int4 import ERROR_ROWS, dequantized, quantized_graph
from flexrank.formats import ONNX_IR_VERSION

FORMS = ("dense", "plain", "gauge")
# {module type: [(parameter, stored transposed as the MatMul's B (K, N))]}
_MATMUL_WEIGHTS = {DenseLinear: [("weight", True)],
                   GaugeLinear: [("V_hat_t", True), ("U_rest", True)],
                   FactorLinear: [("Vt", True), ("Ut", False)]}


@torch.no_grad()
def layer_inputs(model, ranks: dict[str, int], batches, rows: int = ERROR_ROWS,
                 ) -> dict[str, torch.Tensor]:
    """{nested linear layer: (≤ rows, n) float64} its inputs on the token id `batches`
    with the model at `ranks`, rows taken evenly from all positions."""
    layers = {name: layer for name, layer in nested_layers(model).items()
              if isinstance(layer, NestedLinear)}
    found: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [layer.register_forward_pre_hook(
        lambda _m, args, name=name: found[name].append(args[0].reshape(-1, args[0].shape[-1])))
        for name, layer in layers.items()]
    try:
        with at_ranks(model, ranks) as at:
            for ids in batches:
                at(input_ids=torch.as_tensor(ids))
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, parts in found.items():
        if parts:
            stacked = torch.cat(parts).double()
            out[name] = stacked[:: max(1, len(stacked) // rows)][:rows]
    return out


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


def _form_modules(name: str, layer, rank: int) -> dict[str, tuple]:
    modules = {}
    for form in FORMS:
        module, record = deploy_layer(name, layer, rank, policy=FormPolicy(force_form=form))
        module = copy.deepcopy(module).double()
        module.bias = None  # the bias is added alike in every form
        modules[form] = (module, record)
    return modules


@torch.no_grad()
def choose_forms(model, ranks: dict[str, int], batches, config) -> dict[str, dict]:
    """{layer: {"form", "errors": {form: relative output error}, "params": {form: weights}}}
    for every nested linear layer below full rank (module docstring)."""
    inputs = layer_inputs(model, ranks, batches)
    candidates, arrays = {}, {}
    for name, layer in nested_layers(model).items():
        rank = ranks.get(name, layer.max_rank)
        if name not in inputs or rank >= min(layer.U.shape[0], layer.V.shape[0]):
            continue
        candidates[name] = _form_modules(name, layer, rank)
        for form, (module, _) in candidates[name].items():
            for param, transposed in _MATMUL_WEIGHTS[type(module)]:
                value = getattr(module, param).detach().numpy()
                arrays[f"{name}|{form}|{param}"] = value.T if transposed else value
    decoded = quantized_weights(arrays, config) if arrays else {}
    chosen = {}
    for name, forms in candidates.items():
        layer, x = nested_layers(model)[name], inputs[name]
        rank = ranks.get(name, layer.max_rank)
        weight = layer.U.detach().double()[:, :rank] @ layer.V.detach().double()[:, :rank].T
        reference = x @ weight.T  # (rows, m), bias excluded
        errors, params = {}, {}
        for form, (module, record) in forms.items():
            for param, transposed in _MATMUL_WEIGHTS[type(module)]:
                value = torch.from_numpy(decoded[f"{name}|{form}|{param}"])
                getattr(module, param).data = value.T if transposed else value
            errors[form] = float((module(x) - reference).norm() / reference.norm().clamp_min(1e-30))
            params[form] = record.params
        best = min(errors.values())
        fits = [form for form in forms if errors[form] <= config.int4_form_slack * best]
        form = min(fits, key=lambda f: (params[f], errors[f]))
        chosen[name] = {"form": form, "errors": errors, "params": params}
    return chosen
