"""Eigendecompositions of accumulated second-moment matrices, always in fp64.

Factor sums over millions of positions have eigenvalues spread over many orders
of magnitude; fp32 ``eigh`` loses the small ones (which dominate an inverse), so
we symmetrise and decompose in fp64 and only then cast to the storage dtype.
"""

from __future__ import annotations

import torch

from ..errors import StoreError


def eigh_fp64(
    matrix: torch.Tensor,
    count: int | float = 1,
    *,
    name: str = "",
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of ``sym(matrix) / count``.

    Returned in ``dtype`` (default: the matrix's dtype).
    """
    dtype = dtype or matrix.dtype
    m = matrix.to(torch.float64)
    m = (m + m.T) / (2.0 * max(float(count), 1.0))
    if not torch.isfinite(m).all():
        raise StoreError(
            f"second-moment matrix of {name or 'a module'} has NaN/Inf entries; "
            "the model overflowed or --hessian_dtype is too narrow (try fp32)"
        )
    values, vectors = torch.linalg.eigh(m)
    return values.to(dtype), vectors.to(dtype).contiguous()
