"""What happens to gradient rows between collection and use (bergson's PreprocessConfig).

Order matters and follows bergson §3.9: precondition -> (concatenate) -> unit-normalize.
Preconditioning and normalization do not commute, so both sides of a cosine score
get ``H^{-1/2}`` *before* normalizing; inner-product scores put the whole ``H^{-1}``
on the query side.
"""

from __future__ import annotations

import torch

from ..config import PreprocessConfig

F32_EPS = torch.finfo(torch.float32).eps


def unit_normalize(rows: torch.Tensor) -> torch.Tensor:
    """``x / max(‖x‖, eps)`` per row, in fp32 (zero rows stay zero)."""
    rows = rows.float()
    return rows * torch.rsqrt((rows * rows).sum(dim=1, keepdim=True).clamp_min(F32_EPS * F32_EPS))


def hessian_power(pre: PreprocessConfig) -> float:
    """``-1/2`` when both sides are preconditioned (cosine), else ``-1`` (query side only)."""
    return -0.5 if pre.unit_normalize else -1.0


class RowPreprocessor:
    """Precondition then unit-normalize rows laid out per ``grad_sizes``."""

    def __init__(self, pre: PreprocessConfig, grad_sizes: dict[str, int], device="cpu"):
        self.pre = pre
        self.grad_sizes = dict(grad_sizes)
        self.preconditioner = None
        if pre.hessian_path:
            from ..hessians.preconditioner import load_preconditioner

            self.preconditioner = load_preconditioner(
                pre.hessian_path,
                inversion=pre.inversion,
                damping_factor=pre.damping_factor,
                ev_correction=pre.ev_correction,
                device=device,
                modules=list(self.grad_sizes),
            )

    @property
    def active(self) -> bool:
        return self.preconditioner is not None or self.pre.unit_normalize

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.float()
        if self.preconditioner is not None:
            rows = self.preconditioner.apply_inverse(rows, hessian_power(self.pre), self.grad_sizes)
        if self.pre.unit_normalize:
            rows = unit_normalize(rows)
        return rows
