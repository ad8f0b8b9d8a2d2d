"""The Adam/AdamW variant of SOURCE (Bae et al. 2024, App. C and D.2).

An Adam step is a preconditioned gradient step, ``θ ← θ - η P g`` with the diagonal
``P = 1 / (√(v̂ + eps_root) + eps)`` built from the bias-corrected second moments
``v̂ = v / (1 - β₂^t)``. Per segment, bergson averages ``v̂`` over the segment's
checkpoints, forms ``P``, and replaces the eigenvalues by the diagonal
``σ = P ⊙ diag(H)`` of the preconditioned Hessian, where
``diag(H) = (Q_G ∘ Q_G) Λ (Q_A ∘ Q_A)ᵀ`` is the EK-FAC Hessian's diagonal on the
``[O, I']`` gradient grid. The eigenfunctions then act elementwise in parameter space.

``P`` is laid out as the gradient grid: a ``Linear`` weight is ``[O, I]`` already, an HF
``Conv1D`` weight ``[I, O]`` is transposed, and with ``--include_bias`` the bias moments
form the last column (bergson's variant has no bias column).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..hessians.factored import KroneckerFactors


def bias_corrected(v: torch.Tensor, step: int, beta2: float) -> torch.Tensor:
    """``v / (1 - β₂^step)``; zeros before the first step (nothing was seen yet)."""
    v = v.to(torch.float64)
    if step <= 0:
        return torch.zeros_like(v)
    return v / (1.0 - float(beta2) ** int(step))


def mean_moments(per_checkpoint: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The segment's mean ``v̂`` per parameter (every checkpoint must have every one)."""
    if not per_checkpoint:
        raise ValueError("a segment needs at least one checkpoint")
    names = set(per_checkpoint[0])
    for m in per_checkpoint[1:]:
        if set(m) != names:
            raise ValueError("the segment's checkpoints hold second moments of different parameters")
    return {
        n: sum(m[n].to(torch.float64) for m in per_checkpoint) / len(per_checkpoint)  # type: ignore[misc]
        for n in sorted(names)
    }


def preconditioner(v_hat: torch.Tensor, eps: float, eps_root: float) -> torch.Tensor:
    """``P = 1 / (√(v̂ + eps_root) + eps)``, elementwise."""
    return 1.0 / ((v_hat.to(torch.float64) + float(eps_root)).sqrt() + float(eps))


def module_grid(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    *,
    transposed: bool,
    name: str = "",
) -> torch.Tensor:
    """A module's parameter-shaped values on the ``[O, I']`` gradient grid."""
    w = weight.T if transposed else weight
    if tuple(w.shape) != (out_features, in_features):
        raise ValueError(
            f"second moments of {name or 'a module'} have shape {tuple(weight.shape)}; "
            f"expected its weight's shape ({out_features}, {in_features})"
        )
    if bias is None:
        return w.contiguous()
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias moments of {name or 'a module'} have shape {tuple(bias.shape)}")
    return torch.cat([w, bias[:, None]], dim=1).contiguous()


def diag_hessian(kf: KroneckerFactors) -> torch.Tensor:
    """``diag(H)`` on the ``[O, I']`` grid: ``(Q_G ∘ Q_G) Λ (Q_A ∘ Q_A)ᵀ`` (EK-FAC Λ)."""
    lam = kf.grid(True).to(torch.float64)
    return kf.q_g.to(torch.float64).square() @ lam @ kf.q_a.to(torch.float64).square().T


def preconditioned_diagonal(kf: KroneckerFactors, p_grid: torch.Tensor) -> torch.Tensor:
    """``σ = P ⊙ diag(H)``: the diagonal of ``P^½ H P^½``."""
    d = diag_hessian(kf)
    if tuple(p_grid.shape) != tuple(d.shape):
        raise ValueError(
            f"preconditioner grid {tuple(p_grid.shape)} does not match the Hessian grid {tuple(d.shape)}"
        )
    return p_grid.to(torch.float64) * d
