"""Retrain workers for ``validate``: a plain Ray actor per GPU (or CPU slot), and the
driver-side pool that feeds them.

A retrain is a whole training run, so the expensive set-up (tokenizing the training and
query sets, loading the base weights) happens once per actor, in ``__init__``; each call
then retrains one subset (or evaluates one banked model) and returns only the query losses.

The pool hands each idle actor the next job and writes every result the moment it
arrives (``LossBook``: one atomic file per job). When an actor dies, only its job in
flight is lost: that job goes back to the front of the queue and a fresh actor replaces
the dead one. No Ray Data here: jobs are few and long, and a Ray Data pool has no place
to keep per-actor state across the whole run as explicitly as this.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BergsonRayError, unwrap

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
        import ray

        self.engine = spec.build()
        self.faults = faults
        self.jobs_done = 0
        self._shape: Any = None
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

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


@dataclass
class PoolStats:
    computed: int = 0
    """Jobs finished (and written) by this invocation."""
    lost: int = 0
    """Jobs in flight on an actor that died (each was resubmitted)."""
    replaced_actors: int = 0
    seconds: float = 0.0
    per_key_failures: dict[str, int] = field(default_factory=dict)


class RetrainPool:
    """``size`` RetrainWorker actors with the given resources, and the job loop."""

    MAX_FAILURES_PER_JOB = 3

    def __init__(self, spec: Any, size: int, *, num_cpus: float, num_gpus: float, faults=None):
        import ray

        self._cls = ray.remote(RetrainWorker).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0
        )
        self.spec_ref = ray.put(spec)
        self.faults = faults
        self.actors = [self._new_actor() for _ in range(max(1, size))]
        self.stats = PoolStats()

    def _new_actor(self):
        return self._cls.remote(self.spec_ref, self.faults)

    def shape(self) -> Any:
        """The data's shape, from the first actor (its start-up errors surface here)."""
        import ray

        try:
            return ray.get(self.actors[0].shape.remote())
        except Exception as exc:
            err = unwrap(exc)
            if isinstance(err, BergsonRayError):
                raise err from None
            raise

    def run(self, jobs: list[Job], on_result) -> PoolStats:
        """Run every job, calling ``on_result(job, losses)`` as each one finishes."""
        import ray
        from ray.exceptions import RayActorError

        t0 = time.perf_counter()
        pending: deque[Job] = deque(jobs)
        inflight: dict[Any, tuple[int, Job]] = {}
        idle = list(range(len(self.actors)))
        while pending or inflight:
            while idle and pending:
                slot, job = idle.pop(0), pending.popleft()
                inflight[self.actors[slot].run.remote(job)] = (slot, job)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            slot, job = inflight.pop(ready[0])
            try:
                losses = ray.get(ready[0])
            except RayActorError as exc:
                self._replace(slot, job, exc)
                pending.appendleft(job)
            except Exception as exc:
                err = unwrap(exc)
                if isinstance(err, BergsonRayError):
                    raise err from None
                raise
            else:
                on_result(job, losses)
                self.stats.computed += 1
            idle.append(slot)
        self.stats.seconds += time.perf_counter() - t0
        return self.stats

    def _replace(self, slot: int, job: Job, exc: Exception) -> None:
        """A worker died with ``job`` in flight: count it and start a fresh worker."""
        import ray

        err = unwrap(exc)
        if isinstance(err, BergsonRayError):  # died in __init__ on a user error
            raise err from None
        fails = self.stats.per_key_failures.get(job.key, 0) + 1
        self.stats.per_key_failures[job.key] = fails
        if fails > self.MAX_FAILURES_PER_JOB:
            raise RuntimeError(f"retrain {job.key} killed its worker {fails} times: {exc}") from exc
        log.warning("retrain worker %d died during %s; resubmitting it to a new worker", slot, job.key)
        self.stats.lost += 1
        self.stats.replaced_actors += 1
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new_actor()

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
