"""KFAC: token-level second moments of a module's inputs and output gradients.

``A = Σ_s a_s a_sᵀ`` and ``S = Σ_s g_s g_sᵀ`` over the collected positions, so
``F ≈ (S/N) ⊗ (A/N) · N`` for the ``N`` positions (bergson's convention). Pure
sums: invariant to how positions are split into batches, workers and shards.
"""

from __future__ import annotations

import torch

from .accumulator import FactorAccumulator


class KFACAccumulator(FactorAccumulator):
    method = "kfac"

    def _accumulate(self, a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None) -> None:
        a, g = self._positions(a, g, mask)
        self._add("A", a.T @ a)
        self._add("S", g.T @ g)
