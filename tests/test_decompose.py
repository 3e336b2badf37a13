"""DataSVD maths against references: exact reconstruction, optimality vs plain SVD,
tail energy = measured error, monotonicity (hypothesis property test)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexrank.compress.decompose import (
    DegenerateCovarianceError,
    output_error,
    plain_svd,
    symmetric_sqrt,
    tail_energy,
    whitened_svd,
)
from flexrank.planning.costs import gauge_fixed_params as deployed_params


def correlated_inputs(n: int, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -3, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ (mix * scales)


def test_symmetric_sqrt_squares_back():
    X = correlated_inputs(6, 50, 0)
    cov = X.T @ X
    S, S_inv = symmetric_sqrt(cov)
    torch.testing.assert_close(S @ S, cov, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(S @ S_inv, torch.eye(6, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("shape", [(8, 6), (6, 8), (5, 5)])
def test_full_rank_reconstructs_weight(shape):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    X = correlated_inputs(shape[1], 40, 2)
    for f in (plain_svd(W), whitened_svd(W, X.T @ X)):
        torch.testing.assert_close(f.U @ f.V.T, W, rtol=1e-9, atol=1e-9)
        assert f.max_rank == min(shape)
        assert torch.all(f.sigma[:-1] >= f.sigma[1:])


def test_tail_energy_equals_measured_error_and_beats_plain_svd():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(8, 6, generator=g, dtype=torch.float64)
    X = correlated_inputs(6, 200, 4)
    cov = X.T @ X
    data, plain = whitened_svd(W, cov), plain_svd(W)
    tail = tail_energy(data.sigma)
    for r in range(0, 7):
        measured = ((X @ (W - data.U[:, :r] @ data.V[:, :r].T).T) ** 2).sum()
        torch.testing.assert_close(measured, tail[r], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(output_error(W, data.U, data.V, r, cov), tail[r],
                                   rtol=1e-8, atol=1e-10)
        plain_err = output_error(W, plain.U, plain.V, r, cov)
        assert tail[r] <= plain_err * (1 + 1e-9) + 1e-12


def test_degenerate_covariance_raises():
    with pytest.raises(DegenerateCovarianceError, match="zero"):
        whitened_svd(torch.randn(4, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="covariance is"):
        whitened_svd(torch.randn(4, 3), torch.eye(4))


def test_dead_input_channel_is_clamped_not_infinite():
    X = correlated_inputs(5, 60, 5)
    X[:, 2] = 0.0  # a channel the data never uses
    W = torch.randn(7, 5, dtype=torch.float64)
    f = whitened_svd(W, X.T @ X)
    assert torch.isfinite(f.U).all() and torch.isfinite(f.V).all()
    torch.testing.assert_close(f.U @ f.V.T, W, rtol=1e-6, atol=1e-6)


def test_deployed_params_formula():
    assert deployed_params(8, 6, 6) == 48 and deployed_params(6, 8, 6) == 48
    assert deployed_params(8, 6, 2) == 2 * (8 + 6 - 2)
    costs = [deployed_params(1536, 576, r) for r in range(0, 577)]
    assert all(a < b for a, b in zip(costs, costs[1:], strict=False))


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 12), n=st.integers(2, 12), tokens=st.integers(1, 40),
       seed=st.integers(0, 10_000))
def test_error_non_increasing_in_rank_and_never_worse_than_plain(m, n, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = correlated_inputs(n, tokens, seed)
    cov = X.T @ X
    data, plain = whitened_svd(W, cov), plain_svd(W)
    errors = [float(output_error(W, data.U, data.V, r, cov)) for r in range(min(m, n) + 1)]
    scale = max(errors[0], 1e-12)
    assert all(b <= a + 1e-9 * scale for a, b in zip(errors, errors[1:], strict=False))
    for r in range(min(m, n) + 1):
        plain_err = float(output_error(W, plain.U, plain.V, r, cov))
        assert errors[r] <= plain_err + 1e-8 * scale
