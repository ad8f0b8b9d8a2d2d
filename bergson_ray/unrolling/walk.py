"""The query walked back through training, and each segment's transformed query.

With ``L`` segments and the query gradient ``q`` taken at the final checkpoint (bergson's
steps 6 and 7):

* phase 1: ``q_{L-1} = q`` and ``q_{l-1} = F_backward(segment l) q_l``: the query's
  sensitivity carried back to the end of each earlier segment;
* phase 2: ``q̃_l = F_segment(segment l) q_l``: what a training example's gradient is
  dotted with during segment ``l`` (the score is then ``-Σ_l mean_c ⟨g_c(z), q̃_l⟩`` over
  the segment's checkpoints ``c``; see the pipeline).

SGD variant: a spectral function ``f`` of the EK-FAC Hessian acts as
``G ↦ Q_G (f(Λ) ⊙ Q_Gᵀ G Q_A) Q_Aᵀ`` on each module's ``[O, I']`` gradient block.
Adam variant: ``f`` acts elementwise on ``σ = P ⊙ diag(H)`` in parameter space, and
``F_segment`` is Eq. 43's hybrid ``H⁻¹ ((1 - exp(-tσ)) ⊙ G)`` with the damped EK-FAC
inverse of ``--inversion`` / ``--damping_factor``.

Spectral functions are evaluated in fp64, applied in fp32 (as every preconditioner here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..hessians.factored import KroneckerFactors
from ..hessians.preconditioner import FactoredPreconditioner
from .adam import preconditioned_diagonal
from .eigenfunctions import f_backward, f_one_minus_exp, f_segment

Blocks = dict[str, torch.Tensor]
"""module -> ``[B, O·I']`` query rows."""


@dataclass
class Segment:
    """One segment's Hessian, its summed learning rate, and (Adam) its preconditioner."""

    factors: Mapping[str, KroneckerFactors]
    """EK-FAC factors with ``correction`` = the segment's per-document eigenvalues."""
    lr_times_steps: float
    p_grids: Mapping[str, torch.Tensor] | None = None
    """Adam variant: ``P`` per module on the ``[O, I']`` grid."""


class SegmentOperator:
    """``F_backward`` and ``F_segment`` of one segment, per module block."""

    def __init__(
        self,
        segment: Segment,
        *,
        inversion: str = "damped_inverse",
        damping_factor: float = 0.1,
        device: torch.device | str = "cpu",
    ):
        t = float(segment.lr_times_steps)
        self.device = torch.device(device)
        self.adam = segment.p_grids is not None
        self.q: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.back: dict[str, torch.Tensor] = {}
        self.seg: dict[str, torch.Tensor] = {}
        for name, kf in segment.factors.items():
            if kf.correction is None:
                raise ValueError(f"segment factors of {name} carry no EK-FAC eigenvalues")
            if self.adam:
                p = segment.p_grids.get(name)  # type: ignore[union-attr]
                if p is None:
                    raise ValueError(f"no Adam preconditioner grid for module {name}")
                sigma = preconditioned_diagonal(kf, p)
                back, seg = f_backward(t)(sigma), f_one_minus_exp(t)(sigma)
            else:
                self.q[name] = (
                    kf.q_g.to(self.device, torch.float32),
                    kf.q_a.to(self.device, torch.float32),
                )
                lam = kf.correction.to(torch.float64)
                back, seg = f_backward(t)(lam), f_segment(t)(lam)
            self.back[name] = back.to(self.device, torch.float32)
            self.seg[name] = seg.to(self.device, torch.float32)
        self.inverse = (
            FactoredPreconditioner(
                dict(segment.factors),
                inversion=inversion,
                damping_factor=damping_factor,
                ev_correction=True,
                device=self.device,
            )
            if self.adam
            else None
        )

    @property
    def modules(self) -> list[str]:
        return list(self.back)

    def _apply(self, name: str, block: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
        if name not in mult:
            raise KeyError(f"the segment Hessian has no factors for module {name}")
        m = mult[name]
        g = block.to(self.device, torch.float32).reshape(-1, *m.shape)
        if self.adam:
            out = g * m
        else:
            q_g, q_a = self.q[name]
            out = q_g @ ((q_g.T @ g @ q_a) * m) @ q_a.T
        return out.reshape(block.shape[0], -1)

    def backward(self, name: str, block: torch.Tensor) -> torch.Tensor:
        """``F_backward`` of this segment applied to one module's ``[B, O·I']`` rows."""
        return self._apply(name, block, self.back)

    def segment(self, name: str, block: torch.Tensor) -> torch.Tensor:
        """``F_segment`` (Adam: the Eq. 43 hybrid) applied to one module's rows."""
        out = self._apply(name, block, self.seg)
        if self.inverse is not None:
            out = self.inverse.apply_module(name, out, -1.0)
        return out


def walk(
    query: Mapping[str, torch.Tensor], operators: Sequence[SegmentOperator]
) -> tuple[list[Blocks], list[Blocks]]:
    """``([q_0, ..., q_{L-1}], [q̃_0, ..., q̃_{L-1}])`` for one batch of query rows."""
    n = len(operators)
    if n == 0:
        raise ValueError("no segments to walk through")
    walked: list[Blocks] = [{} for _ in range(n)]
    walked[-1] = {k: v.to(torch.float32) for k, v in query.items()}
    for k in range(n - 1, 0, -1):
        walked[k - 1] = {name: operators[k].backward(name, b) for name, b in walked[k].items()}
    transformed = [
        {name: operators[s].segment(name, b) for name, b in walked[s].items()} for s in range(n)
    ]
    return walked, transformed
