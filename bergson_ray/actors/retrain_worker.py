"""Retrain workers for ``validate``: a plain Ray actor per GPU (or CPU slot), and the
driver-side pool that feeds them.

A retrain is a whole training run, so the expensive set-up (tokenizing the training and
query sets, loading the base weights) happens once per actor, in ``__init__``; each call
then retrains one subset (or evaluates one banked model) and returns only the query losses.

The pool (``job_pool.py``) hands each idle actor the next job; the pipeline writes every
result the moment it arrives (``LossBook``: one atomic file per job), and a dead actor
costs only its job in flight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.ray_env import node_id
from .job_pool import JobPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One retrain (``removed``/``weights``) or one banked model to evaluate (``model_dir``)."""

    key: str
    removed: np.ndarray | None = None
    """Documents whose weight becomes ``subset_weight`` (None with ``weights``: all ones)."""
    subset_weight: float = 0.0
    weights: np.ndarray | None = None
    """Explicit per-document weights (``weight_step``), instead of ``removed``."""
    save_to: str | None = None
    """Save the retrained model here as a Hugging Face dir (``--save_models``)."""
    model_dir: str | None = None
    """Evaluate this saved model instead of retraining."""


class RetrainWorker:
    """Ray actor: builds the retraining engine once from ``spec``, then runs jobs."""

    def __init__(self, spec: Any, faults: Any = None):
        self.engine = spec.build()
        self.faults = faults
        self.jobs_done = 0
        self._shape: Any = None
        self.node = node_id()

    def shape(self) -> Any:
        if self._shape is None:
            self._shape = self.engine.shape()
        return self._shape

    def run(self, job: Job) -> np.ndarray:
        """Per-query-document losses of the job's model."""
        if job.model_dir is not None:
            params = self.engine.load(Path(job.model_dir))
        else:
            weights = job.weights
            if weights is None and job.removed is not None:
                weights = np.ones(self.shape().num_train_docs, dtype=np.float32)
                weights[np.asarray(job.removed, dtype=np.int64)] = job.subset_weight
            params = self.engine.retrain(weights)
            if job.save_to is not None:
                self.engine.save(params, Path(job.save_to))
        losses = self.engine.query_losses(params)
        self.jobs_done += 1
        if self.faults is not None:
            # the crash seam of Ray Data workers: after the work, before the result returns
            self.faults.after_batch(self.jobs_done, self.node)
        return np.asarray(losses, dtype=np.float64)


def RetrainPool(
    spec: Any, size: int, *, num_cpus: float, num_gpus: float, faults=None, local=False
) -> JobPool:
    """``size`` :class:`RetrainWorker` actors (``local``: one, in this process); jobs are
    :class:`Job`, keyed by ``job.key``."""
    return JobPool(RetrainWorker, spec, size, num_cpus=num_cpus, num_gpus=num_gpus,
                   faults=faults, what="retrain", key=lambda job: job.key, local=local)
