"""FlexRank: nested low-rank submodels from one pretrained model.

    import flexrank
    model, tokenizer = flexrank.load_model("smollm2-135m")
    batches = flexrank.calibration_data(tokenizer, source="teacher", model=model)
    stats = flexrank.collect_covariances(model, batches)
    flexrank.factorize_(model, stats)
"""

from flexrank.calibration import CalibrationError, calibration_data
from flexrank.covariance import CovarianceStats, collect_covariances
from flexrank.distill import DistillConfig, distill
from flexrank.elastic import ElasticModel
from flexrank.layers import NestedConv1d, NestedConv2d, NestedLinear
from flexrank.models import ModelLoadError, load_model
from flexrank.planner import NestedPlan, plan
from flexrank.probe import ProbeConfig, probe
from flexrank.sensitivity import Sensitivity
from flexrank.surgery import FactorizeConfig, factorize_

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "CovarianceStats",
    "DistillConfig",
    "ElasticModel",
    "FactorizeConfig",
    "ModelLoadError",
    "NestedConv1d",
    "NestedConv2d",
    "NestedLinear",
    "NestedPlan",
    "ProbeConfig",
    "Sensitivity",
    "calibration_data",
    "collect_covariances",
    "distill",
    "factorize_",
    "load_model",
    "plan",
    "probe",
]
