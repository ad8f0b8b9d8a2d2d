"""TKFAC: trace-restricted Kronecker factors, with the final normalisation.

The per-position Fisher of a linear layer is ``F = Σ_s (g_s g_sᵀ) ⊗ (a_s a_sᵀ)``.
TKFAC (Gao et al., 2020) weights each position's activation outer product by the
trace of its gradient outer product and vice versa::

    Â = Σ_s ‖g_s‖² a_s a_sᵀ,   Ŝ = Σ_s ‖a_s‖² g_s g_sᵀ,   Z = Σ_s ‖a_s‖² ‖g_s‖²

and approximates ``F ≈ Ŝ ⊗ Â / Z``, which has exactly the trace of ``F``
(``tr Â = tr Ŝ = Z``). bergson groups by *batch* instead of position (making the
factors depend on batch composition) and leaves the division by ``Z`` as a TODO,
so its factors carry an arbitrary per-module scale. We group by position (batch
invariant) and finish the normalisation: ``finalize`` returns
``A = Â·√(N/Z)``, ``S = Ŝ·√(N/Z)``, so the common KFAC pipeline (eigenvalues of
``A/N`` and ``S/N``, grid ``N·λ_G λ_A``) recomposes to exactly ``Ŝ ⊗ Â / Z``.
"""

from __future__ import annotations

import math

import torch

from .accumulator import FactorAccumulator, Factors


class TKFACAccumulator(FactorAccumulator):
    method = "tkfac"

    def __init__(self, in_features: int, out_features: int, **kwargs):
        # Z is a sum of products of squared norms: keep it in fp64 whatever the factors' dtype.
        trace = torch.zeros((), dtype=torch.float64, device=kwargs.get("device", "cpu"))
        super().__init__(in_features, out_features, extra={"trace": trace}, **kwargs)

    def _accumulate(self, a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None) -> None:
        a, g = self._positions(a, g, mask)
        a2 = a.square().sum(dim=1)  # ‖a_s‖²
        g2 = g.square().sum(dim=1)  # ‖g_s‖²
        wa = a * g2.sqrt()[:, None]
        wg = g * a2.sqrt()[:, None]
        self._add("A", wa.T @ wa)
        self._add("S", wg.T @ wg)
        self._state["trace"].add_((a2 * g2).sum().double())

    def finalize(self) -> Factors:
        n, z = self.routed_count, float(self._state["trace"])
        scale = math.sqrt(n / z) if z > 0 else 0.0
        return Factors(self._state["A"] * scale, self._state["S"] * scale, n)
