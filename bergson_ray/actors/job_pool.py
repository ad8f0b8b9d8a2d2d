"""A pool of plain Ray actors for few, long, stateful jobs (retrains, MAGIC columns).

Each actor builds its expensive state once (``worker_cls(spec, faults)``: tokenized data,
model, saved states) and then runs job after job through ``worker.run(job)``. The driver
hands each idle actor the next job and calls ``on_result`` the moment one finishes. When
an actor dies, only its job in flight is lost: that job goes back to the front of the
queue and a fresh actor replaces the dead one; a job that kills
:attr:`JobPool.MAX_FAILURES_PER_JOB` workers fails the run. No Ray Data here: jobs are few
and long, and each worker keeps per-run state that a Ray Data UDF would rebuild.

With ``local=True`` (one worker on one machine, ``pipelines/in_process.py``) the one
worker is a plain object in the driver's process behind ``local_handles.py``: the same
job loop, no Ray.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from ..errors import BergsonRayError, unwrap

log = logging.getLogger(__name__)


@dataclass
class PoolStats:
    computed: int = 0
    """Jobs finished (and written) by this invocation."""
    lost: int = 0
    """Jobs in flight on an actor that died (each was resubmitted)."""
    replaced_actors: int = 0
    seconds: float = 0.0
    failures: dict[Hashable, int] = field(default_factory=dict)


def _user_error(exc: Exception) -> None:
    """Re-raise a user error (one sentence) hidden in a Ray wrapper; else return."""
    err = unwrap(exc)
    if isinstance(err, BergsonRayError):
        raise err from None


class JobPool:
    """``size`` actors of ``worker_cls`` with the given resources, and the job loop."""

    MAX_FAILURES_PER_JOB = 3

    def __init__(
        self, worker_cls: type, spec: Any, size: int, *, num_cpus: float, num_gpus: float,
        faults: Any = None, what: str = "job", key: Callable[[Any], Hashable] = lambda j: j,
        local: bool = False,
    ):
        import torch

        self.threads = torch.get_num_threads()  # a local worker sets its own: restored
        if local:
            from .local_handles import LocalClass, LocalRay

            self.ray: Any = LocalRay()
            self._cls = LocalClass(worker_cls)
            self.spec_ref = spec
            size = 1
        else:
            import ray

            self.ray = ray
            self._cls = ray.remote(worker_cls).options(
                num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0
            )
            self.spec_ref = ray.put(spec)
        self.faults = faults
        self.what = what
        self.key = key
        self.actors = [self._new_actor() for _ in range(max(1, size))]
        self.stats = PoolStats()

    def _new_actor(self):
        return self._cls.remote(self.spec_ref, self.faults)

    def call(self, method: str, *args: Any) -> Any:
        """Call ``method`` on the first actor (start-up errors surface here, unwrapped)."""
        try:
            return self.ray.get(getattr(self.actors[0], method).remote(*args))
        except Exception as exc:
            _user_error(exc)
            raise

    def run(self, jobs: list[Any], on_result: Callable[..., None] | None = None) -> PoolStats:
        """Run every job; ``on_result(job, result)`` as each one finishes."""
        RayActorError = self.ray.exceptions.RayActorError

        ray = self.ray

        t0 = time.perf_counter()
        pending: deque[Any] = deque(jobs)
        inflight: dict[Any, tuple[int, Any]] = {}
        idle = list(range(len(self.actors)))
        while pending or inflight:
            while idle and pending:
                slot, job = idle.pop(0), pending.popleft()
                inflight[self.actors[slot].run.remote(job)] = (slot, job)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            slot, job = inflight.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError as exc:
                self._replace(slot, job, exc)
                pending.appendleft(job)
            except Exception as exc:
                _user_error(exc)
                raise
            else:
                self.stats.computed += 1
                if on_result is not None:
                    on_result(job, result)
            idle.append(slot)
        self.stats.seconds += time.perf_counter() - t0
        return self.stats

    def _replace(self, slot: int, job: Any, exc: Exception) -> None:
        """A worker died with ``job`` in flight: count it and start a fresh worker."""
        _user_error(exc)  # died in __init__ on a user error
        key = self.key(job)
        fails = self.stats.failures.get(key, 0) + 1
        self.stats.failures[key] = fails
        if fails > self.MAX_FAILURES_PER_JOB:
            raise RuntimeError(f"{self.what} {key} killed its worker {fails} times: {exc}") from exc
        log.warning("worker %d died during %s %s; resubmitting it to a new worker",
                    slot, self.what, key)
        self.stats.lost += 1
        self.stats.replaced_actors += 1
        self.ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new_actor()

    def peak_rss(self) -> list[float]:
        """Peak RSS (MiB) of every live worker (0 for one that cannot answer)."""
        out = []
        for a in self.actors:
            try:
                out.append(round(float(self.ray.get(a.peak_rss_mib.remote(), timeout=30)), 1))
            except Exception:  # noqa: BLE001 - a dying worker must not fail a finished run
                out.append(0.0)
        return out

    def shutdown(self) -> None:
        import torch

        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        self.actors = []
        torch.set_num_threads(self.threads)


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (workers report it for summary.json)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
