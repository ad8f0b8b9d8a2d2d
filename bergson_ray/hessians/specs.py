"""Module shapes as the Hessian sees them, and empty accumulators for them.

Kept apart from ``fitter`` so shard actors, which only merge and decompose,
never import the model-side code (transformers, hooks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config import HessianConfig
from ..utils.dtypes import torch_dtype
from .accumulator import SummedState
from .methods import make_factor_accumulator


@dataclass(frozen=True)
class ModuleSpec:
    """Shape of one target module as the Hessian sees it."""

    out_features: int
    in_features: int
    bias: bool

    @property
    def in_dim(self) -> int:
        """``I'``: input features plus the bias column."""
        return self.in_features + int(self.bias)

    @property
    def factor_cost(self) -> int:
        """Eigendecomposition work (``d³``) of the two factors."""
        return self.in_dim**3 + self.out_features**3



def empty_factor_accumulators(
    specs: Mapping[str, ModuleSpec], hessian_cfg: HessianConfig, device: str = "cpu"
) -> dict[str, SummedState]:
    dtype = torch_dtype(hessian_cfg.hessian_dtype)
    return {
        name: make_factor_accumulator(
            hessian_cfg.method,
            s.in_features,
            s.out_features,
            bias=s.bias,
            dtype=dtype,
            device=device,
        )
        for name, s in specs.items()
    }
