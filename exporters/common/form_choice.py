"""Each low-rank layer's deployment form chosen by its measured output error under the
export's quantizer, one rule for every format (ONNX int4: `exporters/onnx/int4_forms.py`;
ExecuTorch 8da4w: `exporters/executorch/forms_8da4w.py`).

A layer at rank r can ship as one dense matmul (m·n weights), plain factors (r(m+n)) or
gauge-fixed factors (r(m+n−r), DESIGN.md §4.6). Quantized, the forms differ in error as
well as in size: gauge fixing multiplies the error of z = V̂ᵀx by about cond(U[:r]) in the
rebuilt rows (`forms.quantized_policy`), and a dense product of the factors quantizes
differently from the factors themselves. So, per layer: run every form, quantized as the
export quantizes it, on the layer's own inputs (the float model's hidden states at the
exported ranks on calibration token ids, `layer_inputs`) and keep the cheapest form whose
relative output error ‖ŷ − y‖/‖y‖ (y: the float64 layer at rank r, bias excluded) is
within a slack factor of the best form's (`cheapest_within`).
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import torch

from flexrank.compress.layers import NestedLinear
from flexrank.compress.select import nested_layers
from flexrank.exporters.common.forms import FormPolicy, deploy_layer
from flexrank.exporters.executorch.validate import at_ranks

logger = logging.getLogger(__name__)

FORMS = ("dense", "plain", "gauge")
ERROR_ROWS = 512  # input rows per layer on which the forms' errors are measured


def calibration_ids(elastic, sample=None, text: str | None = None, samples: int = 16,
                    tokens: int = 128) -> list[np.ndarray]:
    """Token id batches ((≤ 8, T) int64 each, `samples` rows of `tokens` ids in all, T cut
    to the model's positions, then `sample` (1, T') when it is a tensor of ids): windows of
    `text` (a text/JSONL file or datasets folder, `calibration.load_texts`), else
    sequences sampled from the model with its tokenizer (seed 0), else random ids (seed 0).

    Raises ValueError for `text` without a tokenizer."""
    from flexrank.compress.calibration import load_texts, pack, teacher_samples, token_stream
    from flexrank.compress.models import max_positions

    length = min(tokens, max_positions(elastic.model) or 10**9)
    tokenizer = elastic.tokenizer
    if text is not None:
        if tokenizer is None:
            raise ValueError(f"calibration text {text!r} needs the model's tokenizer; the "
                             "elastic model has none: pass token ids as sample_inputs instead")
        stream = token_stream(tokenizer, load_texts(text))
        rows = pack(stream, samples, length, seed=0, what=str(text))
    elif tokenizer is not None:
        rows = teacher_samples(elastic.model, tokenizer, samples, length, seed=0,
                               progress=False)
    else:
        vocab = elastic.model.config.vocab_size
        rows = torch.randint(0, vocab, (samples, length),
                             generator=torch.Generator().manual_seed(0))
    batches = [rows[i:i + 8].numpy().astype(np.int64) for i in range(0, len(rows), 8)]
    if torch.is_tensor(sample):
        batches.append(sample.numpy().astype(np.int64))
    return batches


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


def low_rank_layers(model, ranks: dict[str, int], inputs: dict) -> dict[str, tuple]:
    """{name: (layer, rank)} of the nested linear layers below full rank that have inputs."""
    out = {}
    for name, layer in nested_layers(model).items():
        rank = ranks.get(name, layer.max_rank)
        if (name in inputs and isinstance(layer, NestedLinear)
                and rank < min(layer.U.shape[0], layer.V.shape[0])):
            out[name] = (layer, rank)
    return out


def form_modules(name: str, layer, rank: int, dtype=torch.float64) -> dict[str, tuple]:
    """{form: (module, LayerExport)}: `layer` at `rank` deployed in each of `FORMS`
    (`forms.deploy_layer`), copied to `dtype`, without its bias (added alike in every form);
    no "gauge" entry when U[:r, :r] is singular."""
    modules = {}
    for form in FORMS:
        try:
            module, record = deploy_layer(name, layer, rank, policy=FormPolicy(force_form=form))
        except ValueError as err:  # `gauge.gauge_fix`: a singular pivot block
            if form != "gauge":
                raise
            logger.info("%s at rank %d: no gauge-fixed form (%s)", name, rank, err)
            continue
        module = copy.deepcopy(module).to(dtype)
        module.bias = None
        modules[form] = (module, record)
    return modules


def float_output(layer, rank: int, x: torch.Tensor) -> torch.Tensor:
    """(rows, m) float64: x (rows, n) through U[:, :r] V[:, :r]ᵀ, bias excluded."""
    weight = layer.U.detach().double()[:, :rank] @ layer.V.detach().double()[:, :rank].T
    return x.double() @ weight.T


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """‖y − reference‖ / ‖reference‖ (Frobenius, float64)."""
    reference = reference.double()
    return float((y.double() - reference).norm() / reference.norm().clamp_min(1e-30))


def cheapest_within(errors: dict[str, float], params: dict[str, int], slack: float) -> str:
    """The form with the fewest stored params among those whose error is at most `slack` ×
    the least error (ties: the smaller error). Forms with a non-finite error (a singular
    gauge block) never qualify. ValueError when no form has a finite error."""
    finite = {form: e for form, e in errors.items() if math.isfinite(e)}
    if not finite:
        raise ValueError(f"no deployment form has a finite output error ({errors}); the "
                         "layer's factors hold inf/NaN: check the checkpoint")
    best = min(finite.values())
    fits = [form for form, e in finite.items() if e <= slack * best]
    return min(fits, key=lambda f: (params[f], finite[f]))
