"""Regularised inverse (square-root) multipliers of Hessian eigenvalues.

Writing ``c`` for ``--damping_factor`` and ``μ`` for the mean of the module's
whole spectrum (the dense eigenvalues, or the full ``[O, I']`` grid), the
multiplier ``m(λ)`` replacing each eigenvalue is:

=====================  ==========================================================
``damped_inverse``     ``1 / (λ + cμ)``
``tikhonov_filtered``  ``λ / (λ² + (cμ)²)``
``pseudoinverse``      ``1/λ`` if ``λ > cμ`` else ``0``
``factored_tikhonov``  ``1 / ((λ_G + √(cμ)/π)(λ_A + π√(cμ)))``, ``π = √(mean λ_A / mean λ_G)``
=====================  ==========================================================

(the factored form expands to bergson's ``λ + π√(cμ)λ_G + (√(cμ)/π)λ_A + cμ``).
Damping relative to ``μ`` makes the result independent of the Hessian's overall
scale. For power ``-½`` the multiplier is ``max(m, 0)^{1/2}`` so that applying it
twice gives exactly the power ``-1`` result. Eigenvalues are clamped at 0 first:
a Gram is PSD, negative values are round-off.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..errors import BadInputError

Inversion = Literal["damped_inverse", "tikhonov_filtered", "pseudoinverse", "factored_tikhonov"]
INVERSIONS: tuple[str, ...] = (
    "damped_inverse",
    "tikhonov_filtered",
    "pseudoinverse",
    "factored_tikhonov",
)
POWERS: tuple[float, ...] = (-1.0, -0.5)


def check_power(power: float) -> float:
    power = float(power)
    if power not in POWERS:
        raise BadInputError(f"Hessian power must be -1 or -0.5, got {power}")
    return power


def eigen_multiplier(
    inversion: str,
    lam: torch.Tensor,
    damping_factor: float,
    power: float = -1.0,
    *,
    factor_eig_a: torch.Tensor | None = None,
    factor_eig_g: torch.Tensor | None = None,
) -> torch.Tensor:
    """``m(λ)^(-power)`` elementwise, computed in fp64.

    ``lam`` is a module's whole spectrum (1-D dense eigenvalues or the 2-D
    ``[O, I']`` grid); ``factored_tikhonov`` also needs the per-factor eigenvalues.
    """
    power = check_power(power)
    if inversion not in INVERSIONS:
        raise BadInputError(
            f"unknown --inversion {inversion!r}; choose from {', '.join(INVERSIONS)}"
        )
    if damping_factor < 0:
        raise BadInputError("--damping_factor must be >= 0")
    lam = lam.double().clamp_min(0)
    mu = lam.mean()
    damp = damping_factor * mu
    if inversion == "damped_inverse":
        m = 1.0 / (lam + damp)
    elif inversion == "tikhonov_filtered":
        m = lam / (lam.square() + damp.square())
    elif inversion == "pseudoinverse":
        safe = torch.where(lam > 0, lam, torch.ones_like(lam))
        m = torch.where(lam > damp, 1.0 / safe, torch.zeros_like(lam))
    else:  # factored_tikhonov
        if factor_eig_a is None or factor_eig_g is None or lam.dim() != 2:
            raise BadInputError(
                "--inversion factored_tikhonov needs a factored (KFAC-family) Hessian"
            )
        la = factor_eig_a.double().clamp_min(0)
        lg = factor_eig_g.double().clamp_min(0)
        tiny = torch.finfo(torch.float64).tiny
        pi = (la.mean() / lg.mean().clamp_min(tiny)).clamp_min(tiny).sqrt()
        root = damp.sqrt()
        m = 1.0 / ((lg + root / pi)[:, None] * (la + pi * root)[None, :])
    m = torch.nan_to_num(m, nan=0.0, posinf=0.0)
    if power == -0.5:
        m = m.clamp_min(0).sqrt()
    return m
