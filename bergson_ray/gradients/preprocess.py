"""What happens to gradient rows between collection and use (bergson's PreprocessConfig).

Order matters and follows bergson §3.9: precondition -> (concatenate) -> unit-normalize.
Preconditioning and normalization do not commute, so both sides of a cosine score
get ``H^{-1/2}`` *before* normalizing; inner-product scores put the whole ``H^{-1}``
on the query side. The worker-side object that loads a Hessian and applies both
steps is :class:`~bergson_ray.runners.preprocess.RowPreprocessor`.
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
