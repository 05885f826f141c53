"""Float64 linear algebra shared by the locate-and-edit methods.

Where the model runs on a GPU the d x d work (MEMIT's and AlphaEdit's solves, AlphaEdit's
eigendecomposition, ROME's C^-1 k) runs there too, in float64, and the results come back to
the caller's device (`device=`; `linalg_device(lm)` picks it). On a Llama-3-8B-shaped model
d = 14,336: an LU solve or a d x d x d product is 2-6 TFLOP, minutes on a CPU and well under
a second on a data-centre GPU. `KEDIT_LINALG_DEVICE=cpu` keeps it on the CPU (a GPU too
small for a few d x d float64 matrices beside the model)."""

from __future__ import annotations

import os

import torch


def linalg_device(lm) -> torch.device:
    """Where the float64 d x d work of a model's edits runs: its GPU when it has one, else the CPU."""
    dev = getattr(lm, "device", torch.device("cpu"))
    if dev.type == "cuda" and os.environ.get("KEDIT_LINALG_DEVICE", "").strip().lower() != "cpu":
        return dev
    return torch.device("cpu")


def _on(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float64) if device is not None else t.double()


def solve_spd(a: torch.Tensor, b: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Solve a x = b in float64 for a symmetric positive (semi)definite `a` (Cholesky, with
    a general LU solve as fallback when `a` is numerically indefinite); on `device` when
    given, the result on b's device."""
    a64, b64 = _on(a, device), _on(b, device)
    chol, info = torch.linalg.cholesky_ex(a64)
    x = torch.cholesky_solve(b64, chol) if int(info) == 0 else torch.linalg.solve(a64, b64)
    return x.to(b.device)


def solve(a: torch.Tensor, b: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Solve a x = b in float64 (general square `a`); on `device` when given, the result on
    b's device."""
    return torch.linalg.solve(_on(a, device), _on(b, device)).to(b.device)


def nullspace_projector(moment: torch.Tensor, threshold: float,
                        device: torch.device | None = None) -> tuple[torch.Tensor, int]:
    """P = U U^T over the eigenvectors of the symmetric `moment` whose eigenvalues are below
    `threshold` (AlphaEdit, Fang et al. 2410.02355 eq. 7-8; `eigh` because the matrix is
    symmetric: same subspace as the reference's SVD, cheaper and exact in ordering).
    Returns (P in float64 on the moment's device, rank of P); computed on `device` when given."""
    m = _on(moment, device)
    m = (m + m.T) / 2
    evals, evecs = torch.linalg.eigh(m)
    keep = evecs[:, evals < threshold]
    return (keep @ keep.T).to(moment.device), int(keep.shape[1])
