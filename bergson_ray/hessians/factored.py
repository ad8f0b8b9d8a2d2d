"""One module's Kronecker-factored Hessian: factors, eigenbases and eigenvalue grids.

Conventions (those of bergson 2.5, so files and magnitudes are interchangeable):

* ``A``/``S``: factor *sums* over ``N`` = ``total_processed`` positions.
* ``q_a``, ``λ_A`` = eigh(``A/N``); ``q_g``, ``λ_G`` = eigh(``S/N``) (fp64, ascending).
* ``eigenvalues = (N/D) · λ_G λ_Aᵀ`` ``[O, I']``: the KFAC eigenvalue grid, an average
  over the ``D`` documents of the token-summed Fisher.
* ``factor_eig_a = √(N/D) λ_A``, ``factor_eig_g = √(N/D) λ_G`` (so their outer
  product is the grid; factored Tikhonov damps them separately).
* ``correction = Σ_n (Q_Gᵀ G_n Q_A)² / D`` ``[O, I']`` (EK-FAC), also per document.

The Hessian the grid represents is ``(Q_G ⊗ Q_A) diag(vec Λ) (Q_G ⊗ Q_A)ᵀ`` acting
on row-major ``vec(G)`` of an ``[O, I']`` gradient; we never form it except in tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .accumulator import Factors
from .eigen import eigh_fp64


@dataclass
class KroneckerFactors:
    q_a: torch.Tensor  # [I', I'] eigenvectors of A/N (columns)
    q_g: torch.Tensor  # [O, O] eigenvectors of S/N
    eigenvalues: torch.Tensor  # [O, I'] (N/D) λ_G λ_Aᵀ
    factor_eig_a: torch.Tensor | None  # [I'] √(N/D) λ_A (absent in old bergson dirs)
    factor_eig_g: torch.Tensor | None  # [O] √(N/D) λ_G
    correction: torch.Tensor | None = None  # [O, I'] EK-FAC Λ* / D
    A: torch.Tensor | None = field(default=None, repr=False)  # [I', I'] raw sums
    S: torch.Tensor | None = field(default=None, repr=False)  # [O, O] raw sums

    @property
    def shape(self) -> tuple[int, int]:
        """``(O, I')``: the gradient block this Hessian acts on."""
        return self.q_g.shape[0], self.q_a.shape[0]

    def grid(self, ev_correction: bool) -> torch.Tensor:
        """The eigenvalue grid to invert: EK-FAC's corrected one or KFAC's."""
        if ev_correction:
            if self.correction is None:
                raise KeyError("no eigenvalue correction was fit for this module")
            return self.correction
        return self.eigenvalues

    def to(self, device=None, dtype=None) -> KroneckerFactors:
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return KroneckerFactors(
            *(
                mv(getattr(self, k))
                for k in ("q_a", "q_g", "eigenvalues", "factor_eig_a", "factor_eig_g")
            ),
            correction=mv(self.correction),
            A=mv(self.A),
            S=mv(self.S),
        )


def fit_kronecker(
    factors: Factors,
    *,
    num_documents: int,
    dtype: torch.dtype = torch.float32,
    name: str = "",
    keep_factors: bool = True,
) -> KroneckerFactors:
    """Eigendecompose a module's final factors (fp64) and form the eigenvalue grids."""
    n = factors.count
    lam_a, q_a = eigh_fp64(factors.A, n, name=f"{name} (activations)", dtype=torch.float64)
    lam_g, q_g = eigh_fp64(factors.S, n, name=f"{name} (gradients)", dtype=torch.float64)
    per_doc = n / max(num_documents, 1)
    grid = torch.outer(lam_g, lam_a) * per_doc
    scale = math.sqrt(per_doc)
    return KroneckerFactors(
        q_a=q_a.to(dtype),
        q_g=q_g.to(dtype),
        eigenvalues=grid.to(dtype),
        factor_eig_a=(lam_a * scale).to(dtype),
        factor_eig_g=(lam_g * scale).to(dtype),
        A=factors.A.to(dtype) if keep_factors else None,
        S=factors.S.to(dtype) if keep_factors else None,
    )


def recompose(kf: KroneckerFactors, ev_correction: bool = False) -> torch.Tensor:
    """The explicit ``[O·I', O·I']`` matrix (tests and tiny modules only)."""
    q = torch.kron(kf.q_g.double(), kf.q_a.double())
    lam = kf.grid(ev_correction).double().reshape(-1)
    return (q * lam) @ q.T
