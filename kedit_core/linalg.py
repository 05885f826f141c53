"""Float64 linear algebra shared by the locate-and-edit methods."""

from __future__ import annotations

import torch


def solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a x = b in float64 for a symmetric positive (semi)definite `a` (Cholesky, with
    a general LU solve as fallback when `a` is numerically indefinite)."""
    a64, b64 = a.double(), b.double()
    chol, info = torch.linalg.cholesky_ex(a64)
    if int(info) == 0:
        return torch.cholesky_solve(b64, chol)
    return torch.linalg.solve(a64, b64)


def solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve a x = b in float64 (general square `a`)."""
    return torch.linalg.solve(a.double(), b.double())


def nullspace_projector(moment: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """P = U U^T over the eigenvectors of the symmetric `moment` whose eigenvalues are below
    `threshold` (AlphaEdit, Fang et al. 2410.02355 eq. 7-8; `eigh` because the matrix is
    symmetric: same subspace as the reference's SVD, cheaper and exact in ordering).
    Returns (P in float64, rank of P)."""
    m = moment.double()
    m = (m + m.T) / 2
    evals, evecs = torch.linalg.eigh(m)
    keep = evecs[:, evals < threshold]
    return keep @ keep.T, int(keep.shape[1])
