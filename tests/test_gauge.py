"""Gauge fixing: the fixed layer computes what the unfixed one does, with the identity block
on the pivot rows and (m + n − r)·r stored numbers; the deployment rule picks sensibly."""

import pytest
import torch

from flexrank.exporters.common.gauge import (
    LayerForm,
    choose_form,
    gauge_fix,
    gauge_fixed_forward,
    leading_condition,
    pivot_rows,
)
from flexrank.planning.costs import gauge_fixed_params as gauge_fixed_cost

SHAPES = [(8, 6, 3), (6, 8, 6), (32, 16, 5), (16, 40, 12), (64, 64, 1), (24, 24, 23)]


def random_factors(m, n, R, seed):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(m, R, generator=g, dtype=torch.float64)
    V = torch.randn(n, R, generator=g, dtype=torch.float64)
    bias = torch.randn(m, generator=g, dtype=torch.float64)
    return U, V, bias


@pytest.mark.parametrize("m,n,r", SHAPES)
@pytest.mark.parametrize("pivots", ["leading", "lu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gauge_fixed_layer_equals_unfixed(m, n, r, pivots, with_bias):
    R = min(m, n)
    U, V, bias = random_factors(m, n, R, seed=m * 100 + n + r)
    bias = bias if with_bias else None
    fixed = gauge_fix(U, V, r, pivots=pivots)
    x = torch.randn(5, 7, n, dtype=torch.float64)
    expected = x @ V[:, :r] @ U[:, :r].T + (0 if bias is None else bias)
    # float64 maths: exact up to cond(U[P,:]) rounding
    torch.testing.assert_close(gauge_fixed_forward(x, fixed, bias), expected,
                               rtol=1e-9 * fixed.condition, atol=1e-9 * fixed.condition)
    # float32 deployment: within float32 tolerance scaled by the condition number
    x32 = x.float()
    got = gauge_fixed_forward(x32, fixed, None if bias is None else bias.float())
    tol = 1e-5 * max(1.0, fixed.condition)
    scale = expected.abs().max().item()
    assert (got.double() - expected).abs().max().item() <= tol * scale
    # the identity block: U G is I on the pivot rows and reproduces U_r Vᵀ_r
    full = fixed.full_U()
    torch.testing.assert_close(full[fixed.pivots], torch.eye(r, dtype=torch.float64))
    torch.testing.assert_close(full @ fixed.V_hat.T, U[:, :r] @ V[:, :r].T)
    stored = fixed.V_hat.numel() + fixed.U_rest.numel()
    assert stored == gauge_fixed_cost(m, n, r) == (m + n - r) * r <= m * n


def test_cost_formula():
    assert gauge_fixed_cost(8, 6, 3) == 33  # 3 · (8 + 6 − 3)
    assert gauge_fixed_cost(1536, 576, 288) == 288 * (1536 + 576 - 288)
    assert gauge_fixed_cost(24, 24, 24) == 24 * 24  # full rank = dense
    assert all(gauge_fixed_cost(16, 9, r) <= 16 * 9 for r in range(10))
    with pytest.raises(ValueError, match="out of range"):
        gauge_fixed_cost(8, 6, 7)


def test_lu_pivots_are_best_conditioned_and_distinct():
    U, V, _ = random_factors(40, 30, 30, seed=3)
    U[1] = U[0] + 1e-8 * torch.randn(30, dtype=torch.float64)  # leading block near-singular
    piv = pivot_rows(U[:, :10])
    assert len(set(piv.tolist())) == 10
    lu = gauge_fix(U, V, 10, pivots="lu")
    assert not lu.is_leading and lu.condition < 1e3
    assert leading_condition(U, 10) > 1e5 * lu.condition
    assert gauge_fix(U, V, 10, pivots="leading").condition == pytest.approx(
        leading_condition(U, 10), rel=1e-9)


def test_singular_pivot_block_is_refused():
    U, V, _ = random_factors(8, 6, 6, seed=1)
    U[:3] = 0
    with pytest.raises(ValueError, match="singular"):
        gauge_fix(U, V, 3)


def test_choose_form_rule():
    assert choose_form(576, 576, 576, condition=1.0) is LayerForm.DENSE  # full rank = β 1
    assert choose_form(576, 576, 540, condition=1.0) is LayerForm.DENSE  # near full rank
    assert choose_form(1536, 576, 288, condition=10.0) is LayerForm.GAUGE
    assert choose_form(1536, 576, 288, condition=1e6) is LayerForm.PLAIN  # ill-conditioned
    assert choose_form(1536, 576, 288, condition=None) is LayerForm.PLAIN
    assert choose_form(576, 576, 288, condition=1e6) is LayerForm.DENSE  # plain ≥ 0.9·dense
    with pytest.raises(ValueError, match="out of range"):
        choose_form(8, 6, 0)


def test_choose_form_by_measured_latency():
    from flexrank.planning.latency_table import LatencyTable

    table = LatencyTable(((576, 576, 576, 10e-6), (576, 576, 540, 9e-6),
                          (576, 576, 432, 14e-6)), threads=2, batch=1, repeats=5)
    assert choose_form(576, 576, 540, 1.0, latency=table) is LayerForm.GAUGE  # measured faster
    assert choose_form(576, 576, 432, 1.0, latency=table) is LayerForm.DENSE  # measured slower
    assert choose_form(576, 576, 100, 1.0, latency=table) is LayerForm.GAUGE  # not measured
    assert choose_form(576, 576, 540, 1e6, latency=table) is LayerForm.DENSE  # ill-conditioned


def test_column_scaling_changes_neither_factors_nor_condition():
    U, V, _ = random_factors(20, 12, 12, seed=5)
    D = torch.logspace(0, 4, 12, dtype=torch.float64)  # DataSVD-like √σ spread
    plain = gauge_fix(U, V, 7)
    scaled = gauge_fix(U * D, V / D, 7)
    torch.testing.assert_close(scaled.U_rest, plain.U_rest)
    torch.testing.assert_close(scaled.V_hat, plain.V_hat)
    assert scaled.condition == pytest.approx(plain.condition, rel=1e-9)
    assert leading_condition(U * D, 7) == pytest.approx(leading_condition(U, 7), rel=1e-9)
