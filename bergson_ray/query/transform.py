"""What happens to store rows before indexing and to query rows before searching.

One rule, used by the exact and the approximate paths alike (spec §3.8, but *always*
precondition first, then normalize — bergson's FAISS path normalizes first):

=====================  ===========================  ==========================
mode                   store rows (index side)       query rows
=====================  ===========================  ==========================
inner product          as stored                     ``H^-1``
cosine                 ``H^-1/2``, unit-normalize    ``H^-1/2``, unit-normalize
=====================  ===========================  ==========================

Rows that the build already preconditioned (``preprocess.hessian_path`` in the store's
``config.yaml``) are not preconditioned again; the query then gets what makes the two
sides consistent (``H^-1/2`` in cosine mode, nothing in inner-product mode, where the
build already applied ``H^-1`` to the rows).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..config import FaissConfig
from ..errors import BadInputError
from .precondition import NumpyPreconditioner, load_row_preconditioner

log = logging.getLogger(__name__)

EPS = float(np.finfo(np.float32).eps)


def unit_normalize(rows: np.ndarray) -> np.ndarray:
    """``x / max(||x||, eps)`` per row (zero rows stay zero), like bergson's builder."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))
    scale = 1.0 / np.maximum(norms, EPS)
    return (rows * scale[:, None].astype(np.float32)).astype(np.float32, copy=False)


@dataclass
class RowTransform:
    """Precondition (optional), then unit-normalize (optional). Non-finite values -> 0."""

    preconditioner: NumpyPreconditioner | None = None
    unit_norm: bool = False

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        out = np.ascontiguousarray(rows, dtype=np.float32)
        if self.preconditioner is not None:
            out = self.preconditioner.apply(out)
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).any(axis=1).sum())
            log.warning("%d row(s) had NaN/inf values; they are set to zero", bad)
            out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        if self.unit_norm:
            out = unit_normalize(out)
        return out


@dataclass(frozen=True)
class BuildPreprocess:
    """The part of a store's build ``preprocess`` config that changed its rows."""

    unit_normalize: bool = False
    hessian_path: str | None = None
    damping_factor: float = 0.1
    inversion: str = "damped_inverse"
    ev_correction: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> BuildPreprocess:
        """From the ``preprocess`` (ours) or ``preprocess_cfg`` (bergson) mapping."""
        if not cfg:
            return cls()
        return cls(
            unit_normalize=bool(cfg.get("unit_normalize", False)),
            hessian_path=cfg.get("hessian_path") or None,
            damping_factor=float(cfg.get("damping_factor", 0.1)),
            inversion=str(cfg.get("inversion", "damped_inverse")),
            ev_correction=bool(cfg.get("ev_correction", False)),
        )


def make_transforms(
    cfg: FaissConfig,
    grad_sizes: Mapping[str, int],
    built: BuildPreprocess | None = None,
) -> tuple[RowTransform, RowTransform]:
    """``(index_side, query_side)`` transforms for ``cfg`` over a store built with ``built``."""
    built = built or BuildPreprocess()
    if cfg.hessian_path and built.hessian_path:
        raise BadInputError(
            f"the store's rows were already preconditioned at build time with "
            f"{built.hessian_path}; do not pass hessian_path={cfg.hessian_path} again"
        )
    unit = cfg.unit_norm or built.unit_normalize
    if cfg.hessian_path:
        power = -0.5 if cfg.unit_norm else -1.0
        pre = load_row_preconditioner(
            cfg.hessian_path,
            grad_sizes,
            power=power,
            damping=cfg.damping_factor,
            inversion=cfg.inversion,
        )
        if cfg.unit_norm:
            return RowTransform(pre, True), RowTransform(pre, True)
        return RowTransform(None, unit), RowTransform(pre, unit)
    if built.hessian_path and built.unit_normalize:
        # Rows hold unit(H^-1/2 g): the query needs the same map to be comparable.
        pre = load_row_preconditioner(
            built.hessian_path,
            grad_sizes,
            power=-0.5,
            damping=built.damping_factor,
            inversion=built.inversion,
            ev_correction=built.ev_correction,
        )
        return RowTransform(None, unit), RowTransform(pre, True)
    return RowTransform(None, unit), RowTransform(None, unit)
