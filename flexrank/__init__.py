"""FlexRank: nested low-rank submodels from one pretrained model.

    import flexrank
    model, tokenizer = flexrank.load_model("smollm2-135m")
    batches = flexrank.calibration_data(tokenizer, source="teacher", model=model)
    stats = flexrank.collect_covariances(model, batches)
    flexrank.factorize_(model, stats)

The package is laid out by concern (README "Layout"): `flexrank.compress` (calibration,
DataSVD, nested layers, probing, distillation, the elastic checkpoint), `flexrank.planning`
(sensitivity, costs, knapsack, nested plans; numpy only), `flexrank.device` (profiles,
the latency model, `--budget auto`; no torch), `flexrank.exporters` (ONNX, ExecuTorch),
`flexrank.runtime` (onnxruntime sessions; no torch) and `flexrank.cli`.

The names below are imported on first use, so that `import flexrank` (and the command
line's `--help`) does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "CalibrationError": "flexrank.compress.calibration",
    "calibration_data": "flexrank.compress.calibration",
    "input_batches": "flexrank.compress.calibration",
    "CovarianceStats": "flexrank.compress.covariance",
    "collect_covariances": "flexrank.compress.covariance",
    "DistillConfig": "flexrank.compress.config",
    "distill": "flexrank.compress.distill",
    "ElasticModel": "flexrank.compress.elastic",
    "NestedConv1d": "flexrank.compress.layers",
    "NestedConv2d": "flexrank.compress.layers",
    "NestedLinear": "flexrank.compress.layers",
    "ModelLoadError": "flexrank.compress.models",
    "load_model": "flexrank.compress.models",
    "ProbeConfig": "flexrank.compress.config",
    "probe": "flexrank.compress.probe",
    "FactorizeConfig": "flexrank.compress.config",
    "factorize_": "flexrank.compress.surgery",
    "factorize_blockwise_": "flexrank.compress.blockwise",
    "CompressConfig": "flexrank.compress.config",
    "compress": "flexrank.compress.pipeline",
    "NestedPlan": "flexrank.planning.planner",
    "plan": "flexrank.planning.planner",
    "Sensitivity": "flexrank.planning.sensitivity",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'flexrank' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
