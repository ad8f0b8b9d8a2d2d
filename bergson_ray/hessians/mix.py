"""TrackStar's mixing of a query and a training ("value") autocorrelation Hessian.

Chang et al. (2024, §A.1.3) precondition with ``H = λ·H_query + (1-λ)·H_train`` so that
the few directions every query shares (task templates, formatting) are downweighted.
λ is chosen, as in bergson 2.5.1, so that the pooled, descending eigenvalue curves of
``λ·H_query`` and ``(1-λ)·H_train`` cross at component ``k = target_downweight_components``:

    λ = σ_train[k-1] / (σ_query[k-1] + σ_train[k-1])

with bergson's fall-backs: 0.99 when the two share no module or both eigenvalues are
zero, 1.0 when ``k <= 0``, ``k`` clamped to the number of pooled eigenvalues, λ clamped
to [0, 1]. Eigenvalues are recomputed here from the stored matrices (fp64 ``eigvalsh``)
rather than read from ``hessians_eigen``: bergson's multi-GPU eigen files sum per-rank
decompositions, and a recomputation is exact and costs ``O(d³)`` per module once.

Pure torch: no Ray, no files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

NO_COMMON_MODULES = 0.99
"""bergson's λ when the two Hessians share no module or both k-th eigenvalues are zero."""

RANK_TOL = 1e-10
"""An eigenvalue below ``RANK_TOL x`` the largest counts as zero (rank deficiency)."""


@dataclass(frozen=True)
class LambdaChoice:
    """λ and why it has that value (what the pipeline logs and warns about)."""

    lam: float
    reason: str
    """``crossing`` (the rule), ``no_common_modules``, ``zero_eigenvalues`` or ``target_not_positive``."""
    k: int = 0
    """The 1-based component the curves cross at, after clamping (0 if unused)."""
    total: int = 0
    """Number of pooled eigenvalues (sum of the common modules' widths)."""
    sigma_query: float = 0.0
    sigma_train: float = 0.0
    query_rank: int = 0
    """Pooled rank of the query Hessian (eigenvalues above ``RANK_TOL x`` the largest)."""

    @property
    def query_rank_deficient(self) -> bool:
        """The query Hessian has fewer than ``k`` non-zero directions, so σ_query[k] = 0
        and λ → 1: the "mix" is the query Hessian alone, which is singular in all but
        ``query_rank`` directions and leaves the preconditioner to the damping."""
        return self.reason == "crossing" and self.k > self.query_rank


def pooled_eigenvalues(hessians: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """Eigenvalues (fp64, clamped at 0) of the named modules' matrices, pooled, descending."""
    parts = []
    for name in names:
        h = hessians[name].to(torch.float64)
        parts.append(torch.linalg.eigvalsh((h + h.T) / 2).clamp(min=0))
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    return torch.sort(torch.cat(parts), descending=True).values


def choose_lambda(
    query: Mapping[str, torch.Tensor],
    train: Mapping[str, torch.Tensor],
    target_components: int,
) -> LambdaChoice:
    """bergson's λ rule for the modules the two Hessians share (see module docstring)."""
    common = [name for name in query if name in train]
    if not common:
        return LambdaChoice(NO_COMMON_MODULES, "no_common_modules")
    if target_components <= 0:
        return LambdaChoice(1.0, "target_not_positive")
    q = pooled_eigenvalues(query, common)
    t = pooled_eigenvalues(train, common)
    total = len(q)
    k = min(target_components, total)
    rank = int((q > RANK_TOL * q[0]).sum()) if total and q[0] > 0 else 0
    sq, st = float(q[k - 1]), float(t[k - 1])
    if sq + st == 0:
        return LambdaChoice(NO_COMMON_MODULES, "zero_eigenvalues", k, total, sq, st, rank)
    lam = min(1.0, max(0.0, st / (sq + st)))
    return LambdaChoice(lam, "crossing", k, total, sq, st, rank)


def mix_hessians(
    query: Mapping[str, torch.Tensor], train: Mapping[str, torch.Tensor], lam: float
) -> dict[str, torch.Tensor]:
    """``λ·H_query + (1-λ)·H_train`` per module of the query Hessian (bergson keeps the
    query's module set), in the query matrices' dtype."""
    missing = [name for name in query if name not in train]
    if missing:
        raise KeyError(f"the training Hessian has no module {missing[0]!r}")
    out = {}
    for name, hq in query.items():
        ht = train[name].to(hq.dtype)
        if ht.shape != hq.shape:
            raise ValueError(
                f"{name}: query Hessian is {tuple(hq.shape)}, training {tuple(ht.shape)}"
            )
        out[name] = hq * lam + ht * (1 - lam)
    return out


__all__ = ["LambdaChoice", "choose_lambda", "mix_hessians", "pooled_eigenvalues"]
