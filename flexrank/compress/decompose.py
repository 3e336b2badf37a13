"""Pure tensor maths for the decomposition: DataSVD (whitened SVD), plain SVD, tail energy.

References:
- SVD-LLM (Wang et al., 2024): truncation-aware data whitening, W S with S Sᵀ = Σ.
- ASVD (Yuan et al., 2023): activation-aware SVD.
- DESIGN.md §4.2: the symmetric eigen square root with a relative floor, in float64.

Shapes follow PyTorch's weight layout: W is (m, n) = (out, in), so y = W x.
Factors: U (m, R) and V (n, R) with W ≈ U Vᵀ, columns ordered by importance, so the
first r columns of both give the best rank-r layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexrank.compress.config import EIGEN_FLOOR

# Eigen-decomposition and SVD run in float64: the whitening factor comes from Σ itself,
# whose eigenvalues span many decades for real activations (float32 Cholesky/inverse is
# the documented failure of SVD-LLM on large models).
COMPUTE_DTYPE = torch.float64


class DegenerateCovarianceError(ValueError):
    """Σ carries no usable information (all zero, or not finite)."""


@dataclass(frozen=True)
class Factors:
    U: torch.Tensor  # (m, R), float64
    V: torch.Tensor  # (n, R), float64
    sigma: torch.Tensor  # (R,), singular values of the (whitened) weight, descending
    whitened: bool

    @property
    def max_rank(self) -> int:
        return int(self.sigma.numel())


@dataclass(frozen=True)
class Whitening:
    """Σ = Q diag(root²) Qᵀ with eigenvalues clamped: S = Q diag(root) Qᵀ, never formed."""

    Q: torch.Tensor  # (n, n) orthogonal, float64
    root: torch.Tensor  # (n,) √λ after clamping
    # eigenvalues raised to floor·λ_max: directions the calibration data (nearly) never
    # took; > 0 means Σ is rank-deficient (too few, repeated or identical sequences)
    clamped: int = 0

    @classmethod
    def of(cls, cov: torch.Tensor, floor: float = EIGEN_FLOOR) -> Whitening:
        cov = cov.to(COMPUTE_DTYPE)
        if not torch.isfinite(cov).all():
            raise DegenerateCovarianceError("covariance has non-finite entries")
        # eigh reads one triangle (the lower): no symmetrised copy, which for an 8B
        # model's 14,336-wide down-projection input would be another 1.6 GB
        eigvals, Q = torch.linalg.eigh(cov)
        lam_max = eigvals.max()
        if lam_max <= 0:
            raise DegenerateCovarianceError(
                "covariance is zero: the layer never saw a non-zero input")
        clamped = int((eigvals < floor * lam_max).sum())
        return cls(Q, eigvals.clamp_min(floor * lam_max).sqrt(), clamped)


def symmetric_sqrt(cov: torch.Tensor,
                   floor: float = EIGEN_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """S = Q diag(√λ) Qᵀ and S⁻¹ for a symmetric PSD matrix, eigenvalues clamped at floor·λ_max."""
    w = Whitening.of(cov, floor)
    return (w.Q * w.root) @ w.Q.T, (w.Q / w.root) @ w.Q.T


def plain_svd(weight: torch.Tensor) -> Factors:
    """W = P diag(σ) Rᵀ; U = P √σ, V = R √σ (the √σ split keeps both factors balanced)."""
    W = weight.to(COMPUTE_DTYPE)
    P, sigma, Rh = torch.linalg.svd(W, full_matrices=False)
    root = sigma.sqrt()
    return Factors(U=P * root, V=Rh.T * root, sigma=sigma, whitened=False)


def whitened_svd(weight: torch.Tensor, cov: torch.Tensor | None = None,
                 floor: float = EIGEN_FLOOR, whitening: Whitening | None = None) -> Factors:
    """DataSVD: minimise E‖(W − U_r V_rᵀ) x‖² for x with second moment Σ (`cov`, (n, n)).

    W S = P diag(σ) Rᵀ, U = P √σ, V = S⁻¹ R √σ. The output error of the rank-r truncation
    on the data is the tail energy Σ_{j>r} σ_j² (exact when no eigenvalue was clamped).
    S is never formed: with A = W Q diag(√λ) = P σ R̃ᵀ, W S = A Qᵀ so R = Q R̃ and
    S⁻¹ R = Q diag(1/√λ) R̃. Layers reading the same input can share one `whitening`.
    """
    m, n = weight.shape
    if whitening is None:
        if cov is None or cov.shape != (n, n):
            shape = None if cov is None else tuple(cov.shape)
            raise ValueError(f"covariance is {shape} but the weight has {n} inputs")
        whitening = Whitening.of(cov, floor)
    Q, lam_root = whitening.Q, whitening.root
    if Q.shape != (n, n):
        raise ValueError(f"whitening is {tuple(Q.shape)} but the weight has {n} inputs")
    A = (weight.to(COMPUTE_DTYPE) @ Q) * lam_root
    P, sigma, Rh = torch.linalg.svd(A, full_matrices=False)
    root = sigma.sqrt()
    V = Q @ (Rh.T / lam_root[:, None]) * root
    return Factors(U=P * root, V=V, sigma=sigma, whitened=True)


def tail_energy(sigma: torch.Tensor) -> torch.Tensor:
    """tail[r] = Σ_{j≥r} σ_j² for r = 0..R (length R+1, tail[R] = 0): error at rank r."""
    sq = sigma.to(COMPUTE_DTYPE).square()
    tail = sq.flip(0).cumsum(0).flip(0)
    return torch.cat([tail, tail.new_zeros(1)])


def relative_tail_energy(sigma: torch.Tensor) -> torch.Tensor:
    """tail_energy normalised by the total: 1 at rank 0, 0 at full rank."""
    tail = tail_energy(sigma)
    return tail / tail[0].clamp_min(torch.finfo(COMPUTE_DTYPE).tiny)


def output_error(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, rank: int,
                 cov: torch.Tensor) -> torch.Tensor:
    """Σ_x ‖(W − U_r V_rᵀ) x‖² = tr(D Σ Dᵀ) with D = W − U_r V_rᵀ and Σ = Σ x xᵀ."""
    W = weight.to(COMPUTE_DTYPE)
    D = W - U[:, :rank].to(COMPUTE_DTYPE) @ V[:, :rank].to(COMPUTE_DTYPE).T
    return torch.einsum("ij,jk,ik->", D, cov.to(COMPUTE_DTYPE), D)

