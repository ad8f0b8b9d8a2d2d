"""Method name -> factor accumulator class (the ``--method`` choices)."""

from __future__ import annotations

import torch

from ..errors import BadInputError
from .accumulator import FactorAccumulator
from .kfac import KFACAccumulator
from .shampoo import ShampooAccumulator
from .tkfac import TKFACAccumulator

FACTOR_ACCUMULATORS: dict[str, type[FactorAccumulator]] = {
    "kfac": KFACAccumulator,
    "tkfac": TKFACAccumulator,
    "shampoo": ShampooAccumulator,
}


def make_factor_accumulator(
    method: str,
    in_features: int,
    out_features: int,
    *,
    bias: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> FactorAccumulator:
    try:
        cls = FACTOR_ACCUMULATORS[method]
    except KeyError:
        raise BadInputError(
            f"unknown factored method {method!r}; choose from {sorted(FACTOR_ACCUMULATORS)}"
        ) from None
    return cls(in_features, out_features, bias=bias, dtype=dtype, device=device)
