"""Ray Data class UDF: gradients of a batch, scored at once against a shared query bank.

The query matrix is put in the object store once by the driver; each worker
fetches it once in its constructor (never per batch). Gradients never leave the
worker: only ``[B, Q]`` scores do.
"""

from __future__ import annotations

import numpy as np

from ..gradients.runner import RunnerSpec
from .gradient_worker import GradientWorker


class ScoreWorker(GradientWorker):
    def __init__(
        self,
        spec: RunnerSpec,
        query: dict,
        mode: str,
        query_batch_size: int | None = None,
        torch_threads: int = 0,
        chaos: dict | None = None,
    ):
        import ray
        import torch

        super().__init__(spec, torch_threads, chaos)
        ref = query["ref"]  # wrapped in a dict so Ray hands us the ref, not a copy per call
        value = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        # object-store arrays are read-only views; torch wants memory it may own
        self.query = torch.from_numpy(np.array(value, dtype=np.float32))
        self.mode = mode
        self.query_batch_size = query_batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        self._maybe_crash()
        return self.guarded(
            lambda idx: self.runner.scores(idx, self.query, self.mode, self.query_batch_size),
            batch["idx"],
        )
