"""The two spectral functions of SOURCE, applied to a segment's eigenvalues ``σ``.

With ``t = η_l K_l`` the segment's summed learning rate (``segments.py``), training
through the segment with a constant Hessian ``H`` multiplies a parameter perturbation by
``exp(-t H)``; its effect on a later query is therefore carried back by

* ``F_backward(σ) = exp(-t σ)`` (Bae et al. Eq. 16), and a training example seen during
  the segment contributes through
* ``F_segment(σ) = (1 - exp(-t σ)) / σ`` (Eq. 20), whose limit at ``σ = 0`` is ``t``
  (plain gradient descent on a flat direction), computed with ``expm1`` so it is exact
  near zero.

The Adam variant's hybrid (Eq. 43) takes only the numerator ``1 - exp(-t σ)`` and lets the
EK-FAC inverse supply the ``1/σ`` (``f_one_minus_exp``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

EigenFunction = Callable[[torch.Tensor], torch.Tensor]


def f_backward(t: float) -> EigenFunction:
    """``σ -> exp(-t σ)``."""

    def fn(sigma: torch.Tensor) -> torch.Tensor:
        return torch.exp(-t * sigma)

    return fn


def f_segment(t: float) -> EigenFunction:
    """``σ -> (1 - exp(-t σ)) / σ``, ``t`` at ``σ = 0``.

    Written as ``t · r(tσ)`` with ``r(x) = -expm1(-x)/x`` in ``[0, 1]`` for ``x >= 0``.
    """

    def fn(sigma: torch.Tensor) -> torch.Tensor:
        x = t * sigma
        zero = x == 0
        safe = torch.where(zero, torch.ones_like(x), x)
        ratio = torch.where(zero, torch.ones_like(x), -torch.expm1(-safe) / safe)
        return t * ratio

    return fn


def f_one_minus_exp(t: float) -> EigenFunction:
    """``σ -> 1 - exp(-t σ)``: the numerator of ``F_segment`` (Adam variant)."""

    def fn(sigma: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(-t * sigma)

    return fn
