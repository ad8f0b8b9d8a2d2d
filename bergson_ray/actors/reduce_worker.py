"""Ray Data class UDF for ``reduce``: per-batch partial sums go to the reducer actor."""

from __future__ import annotations

import numpy as np

from ..gradients.runner import RunnerSpec
from .gradient_worker import GradientWorker


class ReduceWorker(GradientWorker):
    def __init__(self, spec: RunnerSpec, reducer, torch_threads: int = 0, chaos: dict | None = None):
        super().__init__(spec, torch_threads, chaos)
        self.reducer = reducer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        self.calls += 1
        out = self.guarded(self.runner.partial_sum, batch["idx"])
        if "error" in out:
            return out
        # Synchronous: the batch only counts as done once the reducer holds its sum.
        ray.get(self.reducer.add.remote(out["idx"], out.pop("sum")))
        self._maybe_crash()  # after the push: a retry must not double count
        return out
