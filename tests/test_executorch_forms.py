"""8da4w: each layer's form (dense / plain factors / gauge-fixed) chosen by its measured
8da4w output error (`ExecutorchExportConfig.form_slack`, `flexrank-export --form-slack`,
issue 16). References: torchao's own quantized `nn.Linear`s built by hand in the test
from the layer's factors, run on the layer's inputs collected by the test's own hook,
against the float64 product; and ExecuTorch's runtime running the exported program
against an eager 8da4w model built from the forms the manifest records."""

from __future__ import annotations

import pytest
import torch
from conftest import char_tokenizer, token_batches
from elastic_fixtures import nested_plan
from test_executorch_8da4w import MARGIN, ids_off_boundaries, random_norms_
from test_export_executorch import export_8da4w, wide_tiny_llama
from torch import nn

from flexrank.compress.covariance import collect_covariances
from flexrank.compress.elastic import ElasticModel
from flexrank.compress.select import nested_layers
from flexrank.compress.surgery import factorize_
from flexrank.exporters.common.form_choice import ERROR_ROWS, calibration_ids
from flexrank.exporters.executorch.export import ExecutorchExportConfig, exported_ranks
from flexrank.exporters.executorch.forms_8da4w import choose_forms_8da4w
from flexrank.exporters.executorch.validate import at_ranks

pytest.importorskip("executorch.runtime")

BETA, GROUP = 0.4, 32


@pytest.fixture(scope="module")
def elastic():
    """hidden 64, MLP 128: at β 0.4 every layer is at rank 32, one int4 group, below full
    rank; RMSNorm weights random (test_executorch_8da4w.py says why)."""
    model = random_norms_(wide_tiny_llama())
    factorize_(model, collect_covariances(model, token_batches(100), progress=False),
               progress=False)
    return ElasticModel(model, nested_plan(model, (BETA,)), tokenizer=char_tokenizer())


@pytest.fixture(scope="module")
def setting(elastic):
    """(ranks as the 8da4w export aligns them, calibration token id batches)."""
    return exported_ranks(elastic, BETA, "8da4w", GROUP), calibration_ids(elastic, None)


@pytest.fixture(scope="module")
def chosen(elastic, setting):
    ranks, batches = setting
    return {slack: choose_forms_8da4w(elastic.model, ranks, batches, slack, GROUP)
            for slack in (1.0, 1.5, 1e9)}


def torchao_8da4w(weight: torch.Tensor) -> nn.Linear:
    """weight (out, in) float64 as torchao's 8da4w `nn.Linear`: int4 groups of 32 with HQQ
    scales in bfloat16 (what XNNPACK stores), held as float32; int8 dynamic activations."""
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, quantize_

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.float()
    holder = nn.Sequential(linear)
    quantize_(holder, Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP),
        weight_scale_dtype=torch.bfloat16, intx_choose_qparams_algorithm="hqq_scale_only"))
    holder[0].weight.scale = holder[0].weight.scale.float()
    return holder[0]


def inputs_of(model, ranks, name, batches) -> torch.Tensor:
    """(≤ ERROR_ROWS, n) float64: the layer's inputs at `ranks`, every k-th row of all
    positions (the documented rule of `form_choice.layer_inputs`)."""
    rows = []
    layer = model.get_submodule(name)
    handle = layer.register_forward_pre_hook(lambda _m, args: rows.append(args[0]))
    try:
        with at_ranks(model, ranks), torch.no_grad():
            for ids in batches:
                model(input_ids=torch.as_tensor(ids))
    finally:
        handle.remove()
    x = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).double()
    return x[:: max(1, len(x) // ERROR_ROWS)][:ERROR_ROWS]


def test_errors_equal_torchao_run_by_hand(elastic, setting, chosen):
    """One layer: the chooser's error of each form is that of torchao's 8da4w linears,
    built here from U and V (dense W = U Vᵀ; plain Vᵀ then U; gauge-fixed V U[:r]ᵀ then
    U[r:] U[:r]⁻¹ with the first r outputs passed through), against x Wᵀ in float64."""
    ranks, batches = setting
    name = "model.layers.1.mlp.down_proj"  # 64 × 128 at rank 32
    layer = nested_layers(elastic.model)[name]
    r = ranks[name]
    assert r == GROUP < layer.max_rank
    U = layer.U.detach().double()[:, :r]
    V = layer.V.detach().double()[:, :r]
    x = inputs_of(elastic.model, ranks, name, batches)
    assert x.shape == (ERROR_ROWS, V.shape[0])
    reference = x @ (U @ V.T).T
    lead = U[:r]
    down_gauge = torchao_8da4w((V @ lead.T).T)
    up_gauge = torchao_8da4w(U[r:] @ torch.linalg.inv(lead))
    with torch.no_grad():
        xf = x.float()
        outputs = {"dense": torchao_8da4w(U @ V.T)(xf),
                   "plain": torchao_8da4w(U)(torchao_8da4w(V.T)(xf))}
        z = down_gauge(xf)
        outputs["gauge"] = torch.cat([z, up_gauge(z)], dim=-1)
    by_hand = {form: float((y.double() - reference).norm() / reference.norm())
               for form, y in outputs.items()}
    errors = chosen[1.0][name]["errors"]
    assert errors["dense"] == pytest.approx(by_hand["dense"], rel=1e-6)
    assert errors["plain"] == pytest.approx(by_hand["plain"], rel=1e-6)
    # U[:r]⁻¹ by another route than the export's solve: weights equal to float rounding,
    # which moves an int4 code or an HQQ scale here and there
    assert errors["gauge"] == pytest.approx(by_hand["gauge"], rel=0.02)
    # 8 bits of activations, 4 of weights: a few % of the output, more than float noise;
    # the gauge-fixed rows amplify z's error by ‖U[r:] U[:r]⁻¹‖ (forms.quantized_policy)
    assert 0.01 < by_hand["dense"] < 0.5 and by_hand["gauge"] > by_hand["plain"]
    params = chosen[1.0][name]["params"]
    m, n = U.shape[0], V.shape[0]
    assert params == {"dense": m * n, "plain": r * (m + n), "gauge": r * (m + n - r)}


def test_slack_picks_the_least_error_or_the_fewest_params(chosen):
    """slack 1: the form of least error; 1e9: the fewest stored weights; 1.5: the fewest
    among those within 1.5× the least error. The three settings choose differently here."""
    assert chosen[1.0].keys() == chosen[1e9].keys() == chosen[1.5].keys()
    assert len(chosen[1.0]) == 10  # q, o, gate, up, down of 2 blocks (k, v are 64 × 32)
    for name, c in chosen[1.0].items():
        assert c["form"] == min(c["errors"], key=c["errors"].get), name
    for name, c in chosen[1e9].items():
        assert c["params"][c["form"]] == min(c["params"].values()), name
        assert c["form"] == "gauge", name  # r(m+n−r) < r(m+n) <= m·n below full rank
    for name, c in chosen[1.5].items():
        best = min(c["errors"].values())
        fits = {f for f, e in c["errors"].items() if e <= 1.5 * best}
        assert c["form"] in fits
        assert c["params"][c["form"]] == min(c["params"][f] for f in fits), name
    picks = [{c["form"] for c in chosen[s].values()} for s in (1.0, 1.5, 1e9)]
    assert picks[0] != picks[2] and len(set.union(*picks)) >= 2, picks


def test_unknown_slack_is_refused(elastic):
    with pytest.raises(ValueError, match="form_slack 0.9 must be >= 1"):
        ExecutorchExportConfig(form_slack=0.9)
    with pytest.raises(ValueError, match="form slack 0.5 must be >= 1"):
        choose_forms_8da4w(elastic.model, {}, [], 0.5, GROUP)


@pytest.mark.slow
def test_program_has_the_recorded_forms(elastic, tmp_path):
    """One export with form_slack 1.5: the manifest records per layer the form, errors and
    params; the layer records say the same forms; and the `.pte`, run by ExecuTorch's
    runtime, computes what an eager 8da4w model with exactly those forms computes (a
    program with other forms would differ by the quantization error, ~10 % of a layer's
    output, not 1e-5)."""
    from flexrank.exporters.common.forms import deployable_model, quantized_policy
    from flexrank.exporters.executorch.quant import linear_forms_, quantize_8da4w_
    from flexrank.exporters.executorch.validate import load_method

    config = ExecutorchExportConfig(max_seq_len=64, form_slack=1.5)
    entry = export_8da4w(elastic, tmp_path, config=config)["budgets"][0]
    forms = entry["quantization"]["forms"]
    assert len(forms) == 10 and {"dense", "plain"} <= {c["form"] for c in forms.values()}
    for c in forms.values():
        assert set(c) == {"form", "errors", "params"}
        assert set(c["errors"]) == set(c["params"]) == {"dense", "plain", "gauge"}
    records = {layer["name"]: layer["form"] for layer in entry["layers"]}
    assert {name: records[name] for name in forms} == {n: c["form"] for n, c in forms.items()}
    assert entry["validation"]["quantized_reference"]["top1_agreement"] == 1.0

    twin, _ = deployable_model(elastic.model, entry["ranks"],
                               policy=quantized_policy(config.forms),
                               layer_forms={n: c["form"] for n, c in forms.items()})
    linear_forms_(twin)
    quantize_8da4w_(twin, list(entry["ranks"]), GROUP, config.embedding_bits)
    ids = ids_off_boundaries(twin, 12, MARGIN)
    with torch.no_grad():
        expected = twin(input_ids=ids).logits
    got = load_method(tmp_path / entry["graph"]).execute([ids, torch.arange(ids.shape[1])])[0]
    relative = (got - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert float(relative.max()) < 1e-5, relative


# ---- flexrank-export --form-slack ----------------------------------------------------------

@pytest.mark.parametrize("precision", ["none", "int8"])
def test_cli_refuses_form_slack_where_it_means_nothing(precision, tmp_path, capsys):
    from flexrank.cli import export_main

    # refused before the (missing) checkpoint is looked at
    assert export_main([str(tmp_path / "missing"), "--budget", "1", "--quantize", precision,
                        "--form-slack", "1.2", "-o", str(tmp_path / "dist")]) == 2
    err = capsys.readouterr().err
    assert f"--form-slack 1.2 chooses forms by their int4 / 8da4w error; with " \
           f"{'fp32' if precision == 'none' else 'int8'} weights it means nothing" in err
    with pytest.raises(SystemExit):
        export_main([str(tmp_path), "--form-slack", "0.5"])
    assert "--form-slack 0.5: give a factor >= 1" in capsys.readouterr().err


class _Stop(Exception):
    pass


@pytest.mark.parametrize("fmt, quantize, field", [("onnx", "int4", "int4_form_slack"),
                                                  ("executorch", "8da4w", "form_slack")])
def test_cli_form_slack_reaches_the_exporter_config(checkpoint, tmp_path, monkeypatch, fmt,
                                                    quantize, field):
    import flexrank.exporters
    from flexrank.cli import export_main

    seen = {}

    def export_files(elastic, folder, request, **options):
        seen.update(request=request, **options)
        raise _Stop

    monkeypatch.setattr(flexrank.exporters, "export_files", export_files)
    with pytest.raises(_Stop):
        export_main([str(checkpoint), "--budget", "0.8", "--format", fmt, "--quantize",
                     quantize, "--form-slack", "1.3", "-o", str(tmp_path / "dist")])
    assert str(seen["request"].quantize) == quantize
    assert getattr(seen["config"], field) == 1.3
