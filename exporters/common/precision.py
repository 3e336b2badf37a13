"""The precision an export is traced in.

Exported graphs and programs are float32 whatever the model's own dtype: onnxruntime's CPU
execution provider has no bfloat16 MatMul and only partial float16 kernels (optimum's own
exporter refuses fp16 on the CPU for the same reason), torch's ONNX exporter cannot trace
Hugging Face's bf16 rotary embedding ("ScalarType ComplexDouble is an unexpected tensor
scalar type"), and XNNPACK runs float32 (or 8da4w) programs, not bfloat16 ones. A half-
precision model is therefore exported from a float32 copy: the upcast is exact (every bf16
and fp16 value is a float32 value), so the exported weights equal the model's own, and
validation compares the graph with that copy. Quantization (int8, 8da4w) then applies to
those float32 weights as for any float32 model.
"""

from __future__ import annotations

import copy
import logging

import torch

logger = logging.getLogger(__name__)

EXPORT_DTYPE = torch.float32


def floating_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    """The dtypes of the model's floating-point parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return {t.dtype for t in tensors if t.is_floating_point()}


def in_export_precision(elastic):
    """`elastic` itself when every floating tensor is float32, else a float32 deep copy.

    Returns (elastic model to export, the source dtypes as strings, e.g. ["bfloat16"]).
    The copy holds the model twice in memory while the export runs.
    """
    dtypes = floating_dtypes(elastic.model)
    names = sorted(str(d).removeprefix("torch.") for d in dtypes)
    if dtypes <= {EXPORT_DTYPE}:
        return elastic, names
    logger.info("the model is %s: exporting a float32 copy (exact upcast; onnxruntime's CPU "
                "kernels and XNNPACK run float32)", "/".join(names))
    shared = {id(elastic.tokenizer): elastic.tokenizer}  # the tokenizer is not copied
    upcast = copy.deepcopy(elastic, memo=shared)
    upcast.model.to(EXPORT_DTYPE)
    return upcast, names
