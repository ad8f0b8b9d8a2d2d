"""LiSSA workers: a plain Ray actor per GPU (or CPU slot) running repeat after repeat.

A job is one repeat of one query (``depth`` Gauss-Newton products), long enough that a
Ray Data pipeline would only add overhead, and every worker needs the model and the
query store, so set-up happens once per actor. The pool is ``job_pool.py``'s: each
finished repeat is written atomically by its worker, and a dead actor costs only its
repeat in flight.
"""

from __future__ import annotations

from typing import Any

from ..utils.ray_env import node_id
from .job_pool import JobPool, peak_rss_mib
from .lissa_runner import LissaRunner, LissaSpec, repeat_path, write_repeat


class LissaWorker:
    """Ray actor around :class:`~bergson_ray.actors.lissa_runner.LissaRunner`."""

    def __init__(self, spec: LissaSpec, faults: Any = None):
        self.runner = LissaRunner(spec)
        self.faults = faults
        self.jobs_done = 0
        self.node = node_id()

    def scale_check(self) -> float:
        return self.runner.scale_check()

    def peak_rss_mib(self) -> float:
        return peak_rss_mib()

    def run(self, job: tuple[int, int]) -> tuple[int, int]:
        """Compute repeat ``job = (row, repeat)`` and write it; returns ``job``."""
        h = self.runner.compute(job)
        self.jobs_done += 1
        if self.faults is not None:
            # crash seam: after the work, before the file exists (the repeat is lost)
            self.faults.after_batch(self.jobs_done, self.node)
        write_repeat(repeat_path(self.runner.spec.repeats_dir, *job), h)
        return job


def LissaPool(
    spec: LissaSpec, size: int, *, num_cpus: float, num_gpus: float, faults=None, local=False
) -> JobPool:
    """``size`` :class:`LissaWorker` actors (``local``: one, in this process); a job is
    ``(query row, repeat)``."""
    return JobPool(LissaWorker, spec, size, num_cpus=num_cpus, num_gpus=num_gpus,
                   faults=faults, what="LiSSA repeat", local=local)


__all__ = ["LissaPool", "LissaWorker"]
