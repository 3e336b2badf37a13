"""FlexRank: nested low-rank submodels from one pretrained model.

    import flexrank
    model, tokenizer = flexrank.load_model("smollm2-135m")
    batches = flexrank.calibration_data(tokenizer, source="teacher", model=model)
    stats = flexrank.collect_covariances(model, batches)
    flexrank.factorize_(model, stats)
"""

from flexrank.calibration import CalibrationError, calibration_data
from flexrank.covariance import CovarianceStats, collect_covariances
from flexrank.layers import NestedConv1d, NestedConv2d, NestedLinear
from flexrank.models import ModelLoadError, load_model
from flexrank.sensitivity import Sensitivity
from flexrank.surgery import FactorizeConfig, factorize_

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "CovarianceStats",
    "FactorizeConfig",
    "ModelLoadError",
    "NestedConv1d",
    "NestedConv2d",
    "NestedLinear",
    "Sensitivity",
    "calibration_data",
    "collect_covariances",
    "factorize_",
    "load_model",
]
