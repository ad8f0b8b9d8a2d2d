"""Per-retrain query losses on disk, one file per finished retrain.

A retrain costs a full training run, so its result is written the moment it arrives and
never recomputed: ``losses/<key>.npy`` holds that model's per-query-document losses,
written under a temporary name and moved into place with ``os.replace``. A file therefore
exists only when complete, and a resumed run (or one that lost a worker) recomputes exactly
the keys that have no file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

LOSSES_DIR = "losses"


class LossBook:
    """The ``losses/`` directory of one validate run."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / LOSSES_DIR
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.npy"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def missing(self, keys: list[str]) -> list[str]:
        """``keys`` without a finished file, in the given order."""
        return [k for k in keys if not self.has(k)]

    def write(self, key: str, losses: np.ndarray) -> None:
        """Store ``losses`` (float64 ``[num_query_docs]``) under ``key``, atomically."""
        final = self.path(key)
        tmp = final.with_name(f".{final.stem}.tmp-{os.getpid()}.npy")
        np.save(tmp, np.asarray(losses, dtype=np.float64))
        os.replace(tmp, final)

    def read(self, key: str) -> np.ndarray:
        return np.load(self.path(key), allow_pickle=False)

    def finished(self) -> list[str]:
        """Every key with a finished file (temporary files never count)."""
        return sorted(p.stem for p in self.dir.glob("*.npy") if not p.name.startswith("."))


def mean_loss(per_doc: np.ndarray, tokens: np.ndarray) -> float:
    """Token-weighted mean query loss (bergson's single-query loss: all query tokens)."""
    tokens = np.asarray(tokens, dtype=np.float64)
    return float((np.asarray(per_doc, dtype=np.float64) * tokens).sum() / max(tokens.sum(), 1.0))
