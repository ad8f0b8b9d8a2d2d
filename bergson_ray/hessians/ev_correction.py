"""EK-FAC eigenvalue correction: the Fisher's diagonal in the Kronecker eigenbasis.

With ``Q_A``, ``Q_G`` the eigenvectors of the KFAC factors, EK-FAC (George et al.,
2018) replaces the Kronecker eigenvalues by the exact second moments of the
gradients rotated into that basis::

    Λ*[o, i] = Σ_n ((Q_Gᵀ G_n Q_A)[o, i])²,   G_n = Σ_{s collected} g_{n,s} a_{n,s}ᵀ

per *sequence* ``n`` (bergson's definition). Unlike bergson's lambda pass we use
the same collection mask as the factors (padding and the last position of each
document contribute nothing), so a padded batch gives exactly the same sums as
its documents run alone.

The rotated per-sequence gradient is ``(g Q_G)ᵀ (a Q_A)`` summed over positions,
so ``G_n`` itself is never formed in the original basis; documents are processed
in chunks to bound the ``[n, O, I']`` temporary.
"""

from __future__ import annotations

import torch

from .accumulator import COUNT, SummedState, compute_dtype, with_ones

CHUNK_ELEMENTS = 1 << 24
"""Upper bound on the elements of one chunk's ``[n, O, I']`` rotated gradients."""


class EigenCorrectionAccumulator(SummedState):
    """``Σ_n (Q_Gᵀ G_n Q_A)²`` for one module, plus the number of sequences."""

    method = "ev_correction"

    def __init__(
        self,
        q_a: torch.Tensor,
        q_g: torch.Tensor,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.dtype = dtype
        self.compute_dtype = compute_dtype(dtype)
        self.bias = bias
        self.q_a = q_a.to(device=device, dtype=self.compute_dtype)
        self.q_g = q_g.to(device=device, dtype=self.compute_dtype)
        o, i = self.q_g.shape[0], self.q_a.shape[0]
        super().__init__(
            {
                "lambda": torch.zeros(o, i, dtype=dtype, device=device),
                COUNT: torch.zeros((), dtype=torch.int64, device=device),
            }
        )

    def update(
        self,
        a: torch.Tensor,
        g: torch.Tensor,
        mask: torch.Tensor | None,
        routed: torch.Tensor | None = None,
    ) -> None:
        """``a [N, S, I]``, ``g [N, S, O]``, ``mask [N, S]`` of one batch.

        ``routed`` (an MoE expert's positions) changes nothing: the expert's ``a`` and
        ``g`` are zero elsewhere, and the sums are divided by the documents, as bergson does.
        """
        a = a.to(self.compute_dtype)
        g = g.to(self.compute_dtype)
        if self.bias:
            a = with_ones(a)
        if mask is not None:
            a = a * mask[..., None].to(a.dtype)
        o, i = self.q_g.shape[0], self.q_a.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // max(o * i, 1))
        lam = self._state["lambda"]
        for start in range(0, a.shape[0], chunk):
            ra = a[start : start + chunk] @ self.q_a  # [n, S, I']
            rg = g[start : start + chunk] @ self.q_g  # [n, S, O]
            rotated = rg.transpose(1, 2) @ ra  # [n, O, I'] = Q_Gᵀ G_n Q_A
            lam.add_(rotated.square().sum(dim=0).to(lam.dtype))
        self._state[COUNT].add_(a.shape[0])

    def finalize(self) -> torch.Tensor:
        return self._state["lambda"].clone()
