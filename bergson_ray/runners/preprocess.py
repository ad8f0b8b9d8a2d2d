"""What a worker applies to gradient rows between collection and use (bergson's
PreprocessConfig): load the Hessian once, then precondition and unit-normalize.

The math (``H^{-1/2}`` / ``H^{-1}``, unit norm) is in ``gradients/preprocess.py`` and
``hessians/preconditioner.py``; this class only wires a config to it, which is why it
lives here and not in either math package (it needs both).
"""

from __future__ import annotations

import torch

from ..config import PreprocessConfig
from ..gradients.preprocess import hessian_power, unit_normalize


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
