"""TRAK's kernel and weights (Park et al. 2023, as bergson 2.5.1 computes them), pure torch.

For projected per-example gradients ``Φ [n, p]`` of the negative log-odds loss:

* the Gram ``G = Φ_sᵀ Φ_s / n_s`` over the first ``n_s`` training rows (the rows as
  stored, so ``--loss_reduction mean`` rows enter length-normalized, as in bergson);
* the query side is preconditioned with ``G⁻¹`` (the dense ``damped_inverse`` of
  :mod:`.inversion`; bergson's TRAK default damping is 0);
* one member's score of training row ``i`` for query ``q`` is
  ``(1 - p_i) · φ_i · G⁻¹ φ_q / mean|G⁻¹|``, with ``p_i`` the row's mean label-token
  probability; the division by ``mean|G⁻¹|`` puts the members of an ensemble on one scale;
* an ensemble averages the members' *unweighted* scaled scores and multiplies by the
  members' mean ``1 - p_i`` (not the mean of the weighted scores).

Nothing here reads files or knows about Ray: the pipeline streams store rows in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .inversion import eigen_multiplier


class GramSum:
    """Running ``Σ φ_i φ_iᵀ`` (fp64) of row blocks, divided by a row count at the end."""

    def __init__(self, dim: int):
        self.dim = dim
        self.total = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        """Add ``rows [r, p]``."""
        x = rows.to(torch.float64).reshape(-1, self.dim)
        self.total += x.T @ x

    def matrix(self, num_rows: int) -> torch.Tensor:
        """The second moment ``Σ / num_rows`` (fp64; zero when there are no rows)."""
        return self.total / max(int(num_rows), 1)


def gram_matrix(rows: torch.Tensor, num_rows: int | None = None) -> torch.Tensor:
    """``Σ φ_i φ_iᵀ / num_rows`` of ``rows [n, p]`` in one call (``num_rows`` = n)."""
    acc = GramSum(rows.shape[-1])
    acc.add(rows)
    return acc.matrix(len(rows) if num_rows is None else num_rows)


def inverse_gram(
    gram: torch.Tensor, inversion: str = "damped_inverse", damping_factor: float = 0.0
) -> torch.Tensor:
    """Regularised ``G⁻¹`` (fp64) by eigendecomposition, the same multiplier the dense
    preconditioner applies to the query rows (zero eigenvalues map to 0, not ``inf``)."""
    if inversion == "factored_tikhonov":  # no Kronecker factors to split the damping over
        inversion = "damped_inverse"
    g = gram.to(torch.float64)
    lam, q = torch.linalg.eigh((g + g.T) / 2)
    m = eigen_multiplier(inversion, lam, damping_factor, -1.0)
    return (q * m) @ q.T


def inverse_scale(h_inv: torch.Tensor) -> float:
    """``mean|G⁻¹|``: what a member's scores are divided by (bergson's ``trak_scale``).

    Taken from the fp32 matrix, as bergson does, so both tools agree to the last bit
    that fp32 allows."""
    return float(h_inv.to(torch.float32).abs().mean())


def trak_weights(label_probs: torch.Tensor) -> torch.Tensor:
    """``1 - p_i`` per training row (fp64)."""
    return 1.0 - label_probs.to(torch.float64)


def weight_scores(scores: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """One member's final scores: each row of ``scores [n, c]`` times ``weights[i] / scale``."""
    return scores.to(torch.float64) * (weights.to(torch.float64) / scale)[:, None]


def combine_members(
    member_scores: Sequence[torch.Tensor],
    scales: Sequence[float],
    member_weights: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Ensemble scores ``mean_m(S_m / scale_m) · mean_m(w_m)`` from the members'
    *unweighted* scores ``S_m [n, c]`` (fp64)."""
    if not member_scores or not (len(member_scores) == len(scales) == len(member_weights)):
        raise ValueError("need one scale and one weight vector per member")
    acc = torch.zeros(member_scores[0].shape, dtype=torch.float64)
    for s, scale in zip(member_scores, scales):
        acc += s.to(torch.float64) / scale
    weights = torch.stack([w.to(torch.float64) for w in member_weights]).mean(0)
    return acc / len(member_scores) * weights[:, None]


__all__ = [
    "GramSum",
    "combine_members",
    "gram_matrix",
    "inverse_gram",
    "inverse_scale",
    "trak_weights",
    "weight_scores",
]
