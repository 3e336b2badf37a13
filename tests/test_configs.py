"""Every config with `to_dict` reads back with `from_dict`: a non-default instance survives
to_dict -> JSON -> from_dict unchanged, and a wrong type tag, an unknown field, an
unsupported version or a bad enum value is a ValueError that names it (torchao's
config round-trip test)."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest

from flexrank.compress.config import (
    CompressConfig,
    DepthConfig,
    DistillConfig,
    FactorizeConfig,
    ProbeConfig,
)
from flexrank.exporters.common.forms import FormPolicy
from flexrank.exporters.executorch.export import ExecutorchExportConfig
from flexrank.exporters.onnx.convert import OnnxExportConfig
from flexrank.planning.latency_table import LatencyTable
from flexrank.planning.planner import NestedPlan, plan
from flexrank.planning.sensitivity import Sensitivity

TABLE = LatencyTable(((16, 8, 2, 3.5e-6), (16, 8, 8, 1.25e-5)), threads=3, batch=2, repeats=7)
POLICY = FormPolicy(max_condition=50.0, latency=TABLE, force_form="plain", gauge_fixing=False)
PROBE = ProbeConfig(mode="exact", num_levels=4, rank_multiple=16, probe_points=2,
                     top_k=32, fisher_draws=16, fisher_points=1)
DISTILL = DistillConfig(steps=7, batch_size=2, grad_accum=3, lr=1e-3, weight_decay=0.01,
                        warmup_steps=2, min_lr_ratio=0.2, max_grad_norm=0.5, temperature=2.0,
                        sampler="weighted", budget_weights=(1.0, 2.5), uncertainty_weights=True,
                        train_all=True, eval_every=5, checkpoint_every=3,
                        mixed_precision="bf16", seed=4, objective="feature", qat="8da4w",
                        qat_block_size=64, full_budget="refit", intermediate_weight=0.5,
                        balance_factors=True)
FACTORIZE = FactorizeConfig(method="plain", eigen_floor=1e-6, include_lm_head=True)

# One instance per config, every field other than `version` away from its default.
CONFIGS = {
    "FactorizeConfig": FACTORIZE,
    "ProbeConfig": PROBE,
    "DistillConfig": DISTILL,
    "CompressConfig": CompressConfig(calib="corpus.txt", num_samples=32, seq_len=64,
                                     eval_samples=4, batch_size=2, budgets=(0.5, 1.0),
                                     probe=PROBE, probe_samples=3, distill=DISTILL,
                                     factorize=FACTORIZE, seed=3, offload_hidden="hidden",
                                     depth=DepthConfig(max_replaced=0.25, adapter_ranks=(4, 8),
                                                       donor_window=2, eigen_floor=1e-6)),
    "FormPolicy": POLICY,
    "OnnxExportConfig": OnnxExportConfig(opset=17, external_data=True, validate=False,
                                         tolerance=5e-3, generate=False, threads=3,
                                         sample_text="hello there", forms=POLICY,
                                         int8_outlier_ratio=8.0, simplify=False,
                                         elastic_branches=True, fuse_siblings=False,
                                         int4_block_size=64, int4_algorithm="hqq",
                                         int4_symmetric=False, int4_accuracy_level=0,
                                         int4_embedding_bits=8, int4_calibration="text.txt",
                                         int4_calibration_samples=4,
                                         int4_calibration_tokens=32, int4_form_slack=1.5,
                                         context_tokens=512),
    "ExecutorchExportConfig": ExecutorchExportConfig(max_seq_len=64, max_batch=4, group_size=64,
                                                     validate=False, tolerance=5e-3,
                                                     generate=False, sample_text="hi",
                                                     forms=POLICY, embedding_bits=4,
                                                     form_slack=1.25, custom_ops=False),
}


def through_json(config):
    return type(config).from_dict(json.loads(json.dumps(config.to_dict())))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_through_json(name):
    config = CONFIGS[name]
    default = type(config)()
    away = [f.name for f in fields(config) if f.name != "version"
            and getattr(config, f.name) == getattr(default, f.name)]
    assert not away, f"{name}: fields {away} left at their default do not test the round trip"
    data = config.to_dict()
    assert data["type"] == name and data["version"] == 1
    back = through_json(config)
    assert back == config and type(back) is type(config)
    assert back.to_dict() == data


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_wrong_tag_unknown_field_and_version_are_refused(name):
    data = CONFIGS[name].to_dict()
    kind = type(CONFIGS[name])
    other = "ProbeConfig" if name != "ProbeConfig" else "DistillConfig"
    with pytest.raises(ValueError, match=f"a {other} cannot be read as a {name}"):
        kind.from_dict({**data, "type": other})
    with pytest.raises(ValueError, match=rf"{name} has no field\(s\) \['colour'\]"):
        kind.from_dict({**data, "colour": "red"})
    with pytest.raises(ValueError, match=f"{name} version 2 is not supported"):
        kind.from_dict({**data, "version": 2})
    # the tag may be left out (nested configs are written without one)
    assert kind.from_dict({k: v for k, v in data.items() if k != "type"}) == CONFIGS[name]


@pytest.mark.parametrize("kind, key, value, message", [
    (FactorizeConfig, "method", "qr", r"method 'qr' is not one of 'data', 'plain'"),
    (ProbeConfig, "mode", "slow", r"probe mode 'slow' is not one of 'exact', 'fast'"),
    (DistillConfig, "sampler", "random", r"sampler 'random' is not one of 'uniform'"),
    (DistillConfig, "mixed_precision", "fp8", r"mixed_precision 'fp8' is not one of 'auto'"),
    (FormPolicy, "force_form", "diagonal", r"force_form 'diagonal' is not 'plain', 'dense'"),
])
def test_bad_enum_value_is_refused(kind, key, value, message):
    data = CONFIGS[kind.__name__].to_dict()
    with pytest.raises(ValueError, match=message):
        kind.from_dict({**data, key: value})


def test_nested_configs_are_checked_too():
    data = CONFIGS["CompressConfig"].to_dict()
    with pytest.raises(ValueError, match="sampler 'random'"):
        CompressConfig.from_dict({**data, "distill": {**data["distill"], "sampler": "random"}})
    with pytest.raises(ValueError, match=r"ProbeConfig has no field\(s\) \['speed'\]"):
        CompressConfig.from_dict({**data, "probe": {**data["probe"], "speed": 1}})
    for kind in (OnnxExportConfig, ExecutorchExportConfig):
        data = CONFIGS[kind.__name__].to_dict()
        with pytest.raises(ValueError, match="force_form 'diagonal'"):
            kind.from_dict({**data, "forms": {**data["forms"], "force_form": "diagonal"}})
        with pytest.raises(ValueError, match="a DistillConfig cannot be read as a FormPolicy"):
            kind.from_dict({**data, "forms": {**data["forms"], "type": "DistillConfig"}})
        with pytest.raises(ValueError, match="FormPolicy.latency is not a latency table"):
            kind.from_dict({**data, "forms": {**data["forms"], "latency": {"rows": []}}})


def test_form_policy_without_a_table_and_with_an_unwritable_cost():
    assert through_json(FormPolicy()) == FormPolicy()
    with pytest.raises(ValueError, match="latency of type function cannot be serialised"):
        FormPolicy(latency=lambda m, n, r: 1.0).to_dict()


# ---- the planning records (tagged by format rather than type) ---------------------------


def test_latency_table_round_trip():
    back = LatencyTable.from_dict(json.loads(json.dumps(TABLE.to_dict())))
    assert back == TABLE and back(16, 8, 2) == 3.5e-6


def test_sensitivity_and_plan_round_trip():
    rng = np.random.default_rng(0)
    errors = np.sort(rng.exponential(1.0, size=(2, 3)), axis=1)[:, ::-1].copy()
    errors[:, -1] = 0.0
    sens = Sensitivity(["a.fc", "b.fc"], [(12, 8), (6, 10)], np.array([[2, 4, 8], [1, 3, 6]]),
                       errors, {"mode": "exact"})
    back = Sensitivity.from_dict(json.loads(json.dumps(sens.to_dict())))
    assert back.layer_names == sens.layer_names and back.shapes == sens.shapes
    assert back.meta == sens.meta
    np.testing.assert_array_equal(back.ranks, sens.ranks)
    np.testing.assert_array_equal(back.errors, sens.errors)  # float64 survives JSON exactly
    with pytest.raises(ValueError, match="not a FlexRank sensitivity file"):
        Sensitivity.from_dict({**sens.to_dict(), "format": "flexrank-plan"})

    nested = plan(sens, budgets=[0.5, 1.0])
    assert NestedPlan.from_dict(json.loads(json.dumps(nested.to_dict()))) == nested
    with pytest.raises(ValueError, match="not a FlexRank plan"):
        NestedPlan.from_dict({**nested.to_dict(), "format": "flexrank-sensitivity"})
    with pytest.raises(ValueError, match="plan format version 2 is not supported"):
        NestedPlan.from_dict({**nested.to_dict(), "format_version": 2})


def test_balance_factors_keys_the_resume_signature_only_when_set():
    """A folder made before DistillConfig.balance_factors (no key) resumes under the default
    (off); on changes the training, so it keys the resume."""
    default = CompressConfig().signature("m")["distill"]
    assert "balance_factors" not in default
    keyed = CompressConfig(distill=DistillConfig(balance_factors=True)).signature("m")
    assert keyed["distill"]["balance_factors"] is True
    assert {k: v for k, v in keyed["distill"].items() if k != "balance_factors"} == default
    config = CompressConfig(distill=DistillConfig(balance_factors=True))
    assert CompressConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
