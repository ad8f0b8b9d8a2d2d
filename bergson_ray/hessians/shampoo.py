"""Shampoo factors: second moments of each batch's summed weight gradient.

Per batch ``G_b = Σ_s g_s a_sᵀ`` (``[O, I']``, summed over the batch's collected
positions), ``A += G_bᵀ G_b`` and ``S += G_b G_bᵀ``; at the end ``A`` is divided
by its trace (bergson's convention). Because ``G_b`` sums over whatever documents
share a batch, the factors depend on the batching **by construction**: they are
not invariant to ``token_batch_size`` or to how batches are spread over workers
(the sums over batches still merge exactly across workers and shards).
"""

from __future__ import annotations

import torch

from .accumulator import FactorAccumulator, Factors


class ShampooAccumulator(FactorAccumulator):
    method = "shampoo"

    def _accumulate(self, a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None) -> None:
        a, g = self._positions(a, g, mask)
        grad = g.T @ a  # [O, I']
        self._add("A", grad.T @ grad)
        self._add("S", grad @ grad.T)

    def finalize(self) -> Factors:
        A = self._state["A"]
        trace = A.diagonal().sum()
        A = A / trace if float(trace) > 0 else A.clone()
        return Factors(A, self._state["S"].clone(), self.routed_count)
