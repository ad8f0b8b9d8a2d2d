"""The reducer actor: owns the running sum of every worker's partial sums.

Workers push one partial sum per batch of documents (never per row). Ray Data
re-runs the batches of a crashed worker, so a push can arrive twice; the reducer
remembers which documents it has counted and ignores a repeated batch, making
``add`` idempotent and the final sum exact.
"""

from __future__ import annotations

import numpy as np

from .local_handles import lazy_actor_classes


class RunningSum:
    """The reducer's state and rules; :data:`Reducer` is this class as a Ray actor, and a
    run with its one worker in the driver's process uses it directly."""

    def __init__(self, num_items: int, dim: int):
        self.total = np.zeros(dim, dtype=np.float64)
        self.counted = np.zeros(num_items, dtype=bool)
        self.duplicates = 0

    def add(self, idx: np.ndarray, partial: np.ndarray) -> bool:
        """Add one batch's partial sum; False (and no change) if it was already counted."""
        seen = self.counted[idx]
        if seen.all() and len(idx):
            self.duplicates += 1
            return False
        if seen.any():
            raise RuntimeError(
                f"batch overlaps already-counted documents {np.asarray(idx)[seen][:5].tolist()}"
            )
        self.total += partial
        self.counted[idx] = True
        return True

    def result(self) -> tuple[np.ndarray, int, int]:
        """``(sum, documents counted, duplicate pushes ignored)``."""
        return self.total, int(self.counted.sum()), self.duplicates


__getattr__ = lazy_actor_classes(__name__, Reducer=(RunningSum, dict(num_cpus=0, max_restarts=0)))
"""``Reducer``: :class:`RunningSum` as a Ray actor (made on first use)."""
