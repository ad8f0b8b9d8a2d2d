"""Ray Data class UDF that owns one model replica and turns row indices into gradients.

One instance per GPU (``num_gpus=1``) or per CPU slot. Ray Data restarts a crashed
instance and re-runs the batches it lost, so each row reaches the driver once.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from ..errors import BergsonRayError, encode_error
from ..gradients.runner import GradientRunner, RunnerSpec

log = logging.getLogger(__name__)


class GradientWorker:
    """``ds.map_batches(GradientWorker, fn_constructor_kwargs={...})``."""

    def __init__(self, spec: RunnerSpec, torch_threads: int = 0, chaos: dict | None = None):
        import torch

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        if spec.device == "auto":
            spec.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.runner = GradientRunner(spec)
        self.chaos = chaos or {}
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        self._maybe_crash()
        return self.guarded(self.runner.gradients, batch["idx"])

    @staticmethod
    def guarded(fn, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``fn(idx)``; a user error becomes an ``error`` column the driver re-raises.

        Ray Data re-wraps exceptions from UDFs and drops the original's type, so the
        user would otherwise get a Ray traceback instead of one clear sentence.
        """
        try:
            t0 = time.perf_counter()
            out = fn(idx)
            # busy time per row: the driver sums it into the run's compute throughput
            out["compute_s"] = np.full(len(idx), (time.perf_counter() - t0) / max(len(idx), 1))
            return out
        except BergsonRayError as err:
            return {"idx": np.asarray(idx), "error": np.array([encode_error(err)] * len(idx))}

    def _maybe_crash(self) -> None:
        """Fault injection for tests: die hard once after N batches (first incarnation only)."""
        after, marker = self.chaos.get("crash_after_batches", 0), self.chaos.get("marker")
        if after and self.calls > after and marker and not os.path.exists(marker):
            open(marker, "w").close()
            log.warning("chaos: worker pid %d exiting after %d batches", os.getpid(), after)
            os._exit(1)
