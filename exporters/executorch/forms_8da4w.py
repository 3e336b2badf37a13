"""8da4w: each low-rank layer's deployment form chosen by its measured output error
(`ExecutorchExportConfig.form_slack`; the rule: `exporters/common/form_choice.py`).

Each candidate form (dense W, plain Vᵀ and U, gauge-fixed V̂ᵀ and Û_rest) of a layer at its
exported rank is made into `nn.Linear` children and quantized exactly as the export does
it (`quant.linear_forms_`, `quant.quantize_8da4w_`: torchao's
`Int8DynamicActivationIntxWeightConfig`, int4 weights in groups of `group_size` with HQQ
scales rounded to bfloat16), then run in float32 on the layer's calibration inputs. The
measured error is of the whole quantized layer: torchao's 8da4w also quantizes every
linear's input per token to int8 (dynamic, asymmetric), so a factorised form pays that
twice (x, then z = Vᵀx) and a gauge-fixed one sees z's error amplified by ‖Û_rest‖ in its
rebuilt rows — which is why the forms are measured rather than ranked by a formula.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from flexrank.exporters.common.form_choice import (
    cheapest_within,
    float_output,
    form_modules,
    layer_inputs,
    low_rank_layers,
    relative_error,
)
from flexrank.exporters.executorch.quant import linear_forms_, quantize_8da4w_


class _Holder(nn.Module):
    """A parent for one deployment form: `linear_forms_` and `quantize_8da4w_` swap
    children, never the module they are given."""

    def __init__(self, form: nn.Module):
        super().__init__()
        self.layer = form


def quantized_form(form: nn.Module, group_size: int) -> nn.Module:
    """`form` (a `forms.DenseLinear` / `FactorLinear` / `GaugeLinear`, float32) as the 8da4w
    export runs it: `nn.Linear` children quantized by `quantize_8da4w_` (in place).

    Raises `quant.QuantizationShapeError` when an input width is not a multiple of
    `group_size` (the export would refuse the layer the same way)."""
    holder = _Holder(form)
    linear_forms_(holder)
    quantize_8da4w_(holder, ["layer"], group_size, embedding_bits=None)
    return holder.layer


@torch.no_grad()
def choose_forms_8da4w(model, ranks: dict[str, int], batches, slack: float,
                       group_size: int) -> dict[str, dict]:
    """{layer: {"form", "errors": {form: relative output error}, "params": {form: stored
    weights}}} for every nested linear layer of `model` below full rank at `ranks`:
    `batches` (token id arrays (B, T)) give each layer's inputs at `ranks` (≤ 512 rows);
    "form" is the cheapest form whose error is within `slack` (≥ 1) × the least error
    (module docstring). The model is not modified."""
    if not slack >= 1:
        raise ValueError(f"form slack {slack} must be >= 1 (1: the form of least error)")
    inputs = layer_inputs(model, ranks, batches)
    chosen = {}
    layers = low_rank_layers(model, ranks, inputs)
    for name, (layer, rank) in tqdm(layers.items(), desc="8da4w forms", unit="layer",
                                    disable=None):
        x = inputs[name]  # (rows, n) float64
        reference = float_output(layer, rank, x)
        errors, params = {}, {}
        for form, (module, record) in form_modules(name, layer, rank, torch.float32).items():
            quantized = quantized_form(module, group_size)
            errors[form] = relative_error(quantized(x.float()), reference)
            params[form] = record.params
        chosen[name] = {"form": cheapest_within(errors, params, slack), "errors": errors,
                        "params": params}
    return chosen
