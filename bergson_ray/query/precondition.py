"""Hessian preconditioning of gradient rows for the FAISS path, numpy in and out.

The maths lives in :mod:`bergson_ray.hessians.preconditioner` (dense ``H^p = Q diag(m)
Q^T`` per module, or the factored rotate/scale/rotate) and is the very code ``build``
and ``score`` use, so a store preconditioned at build time and a query preconditioned
here agree to the last bit. This module only adapts it to the index code: numpy rows,
one fixed power, and errors raised when the Hessian is *loaded* (not at the first query)
when it does not fit the store's rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..errors import BadInputError, StoreError

log = logging.getLogger(__name__)


class NumpyPreconditioner(Protocol):
    """Anything that maps ``[N, D]`` float32 rows to preconditioned rows of the same shape."""

    def apply(self, rows: np.ndarray) -> np.ndarray: ...


class RowPreconditioner:
    """``H^power`` applied block-wise to flat rows laid out as ``grad_sizes``."""

    def __init__(self, inner, power: float, grad_sizes: Mapping[str, int]):
        self.inner = inner
        self.power = float(power)
        self.grad_sizes = dict(grad_sizes)
        self.dim = sum(self.grad_sizes.values())

    def apply(self, rows: np.ndarray) -> np.ndarray:
        arr = np.ascontiguousarray(rows, dtype=np.float32)
        if not arr.flags.writeable:  # memmap slices; torch wants writable memory
            arr = arr.copy()
        t = torch.from_numpy(arr)
        with torch.no_grad():
            out = self.inner.apply_inverse(t, self.power, self.grad_sizes)
        return out.numpy()


def load_row_preconditioner(
    hessian_path: str | Path,
    grad_sizes: Mapping[str, int],
    *,
    power: float,
    damping: float = 0.1,
    inversion: str = "damped_inverse",
    ev_correction: bool = False,
) -> NumpyPreconditioner:
    """Open a Hessian dir (dense ``hessians.safetensors``/``.pth``, or factored) for rows
    laid out as ``grad_sizes``. Modules without a Hessian pass through (logged)."""
    from ..hessians.preconditioner import load_preconditioner as load_hessian

    path = Path(hessian_path)
    if not path.exists():
        raise StoreError(f"Hessian path {path} does not exist")
    try:
        inner = load_hessian(
            str(path),
            inversion=inversion,
            damping_factor=damping,
            ev_correction=ev_correction,
            modules=list(grad_sizes),
        )
    except BadInputError as err:
        raise StoreError(str(err)) from None
    covered = [m for m in grad_sizes if m in inner.modules]
    if not covered:
        raise StoreError(
            f"the Hessians in {path} cover none of the store's modules "
            f"(store: {list(grad_sizes)[:3]}..., Hessians: {list(inner.modules)[:3]}...)"
        )
    for m in covered:
        if inner.module_dim(m) != grad_sizes[m]:
            raise StoreError(
                f"Hessian for module {m!r} acts on {inner.module_dim(m)}-wide gradients, but "
                f"the store's rows hold {grad_sizes[m]} values for it (was it fit with the "
                "same projection_dim / include_bias?)"
            )
    missing = [m for m in grad_sizes if m not in inner.modules]
    if missing:
        log.warning("no Hessian for %d module(s), left as they are: %s", len(missing), missing)
    return RowPreconditioner(inner, power, grad_sizes)
