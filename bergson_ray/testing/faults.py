"""Fault injection for tests: one typed plan, passed explicitly, checked at one seam each.

Pipelines take it keyword-only (``build(..., faults=FaultPlan(...))``) and hand it to
the parts that can fail; ``None`` (the default everywhere) means no fault. Nothing is
read from the environment.

Seams (one per kind of worker):

* Ray Data workers (``actors/batch_worker.py``) call :meth:`FaultPlan.after_batch` once
  per batch, after the batch is computed and its side effects are done (a reduce
  worker's push), just before returning it;
* Hessian workers (``actors/hessian_shard.py``) call :meth:`FaultPlan.before_window`;
* the Hessian driver (``pipelines/sharded_fit.py``) asks :meth:`FaultPlan.shard_to_kill`
  at each stage;
* the storage check (``pipelines/storage.py``) asks :meth:`FaultPlan.hides_storage`
  with the id of the node it runs on.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

SHARD_STAGES = ("accumulate", "merge_factors", "merge_correction", "finalize", "write")
"""Where the Hessian driver can kill a shard."""


@dataclass(frozen=True)
class FaultPlan:
    crash_worker_after_batches: int | None = None
    """A Ray Data worker process exits hard (``os._exit``) during batch N+1, after
    computing it and doing its side effects but before returning it."""
    crash_hessian_worker_after_windows: int | None = None
    """A Hessian worker process exits hard when asked for window N+1."""
    crash_marker: str | None = None
    """File a crash creates; while it exists no worker crashes again, so only the first
    incarnation dies (a restarted worker gets the same plan). Required by both crashes."""
    kill_shard: int = 0
    """Which Hessian shard the driver kills (``ray.kill``) ..."""
    kill_shard_at: str | None = None
    """... and when: one of :data:`SHARD_STAGES`, or several comma-separated (once at each)."""
    batch_delay_s: float = 0.0
    """Every Ray Data batch takes this much longer (so a test can act mid-run)."""
    trace_dir: str | None = None
    """Every finished Ray Data batch leaves a file ``<node id>.<pid>.<n>`` here."""
    unshared_nodes: tuple[str, ...] = ()
    """Ray node ids that behave as if they did not mount the run's file system: the
    storage check there sees none of the driver's paths."""

    def __post_init__(self) -> None:
        crashes = (self.crash_worker_after_batches, self.crash_hessian_worker_after_windows)
        if any(c is not None for c in crashes) and not self.crash_marker:
            raise ValueError("a crash needs crash_marker (it keeps restarted workers alive)")
        if self.kill_shard_at is not None and not set(self.kill_shard_stages()) <= set(SHARD_STAGES):
            raise ValueError(f"kill_shard_at must name stages among {SHARD_STAGES}")

    # -- seams -------------------------------------------------------------------------
    def after_batch(self, batches: int, node: str) -> None:
        """Ray Data worker, batch number ``batches`` (1-based) done on ``node``."""
        self._crash(self.crash_worker_after_batches, batches, "worker")
        if self.batch_delay_s:
            time.sleep(self.batch_delay_s)
        if self.trace_dir:
            open(os.path.join(self.trace_dir, f"{node}.{os.getpid()}.{batches}"), "w").close()

    def before_window(self, windows: int) -> None:
        """Hessian worker, asked for window number ``windows`` (1-based)."""
        self._crash(self.crash_hessian_worker_after_windows, windows, "hessian worker")

    def shard_to_kill(self, stage: str) -> int | None:
        """Hessian driver at ``stage``: the shard to kill, or None. The driver kills at most
        once per stage (a stage such as ``merge_factors`` is reached several times)."""
        return self.kill_shard if stage in self.kill_shard_stages() else None

    def kill_shard_stages(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in (self.kill_shard_at or "").split(",") if s.strip())

    def hides_storage(self, node: str) -> bool:
        """Does ``node`` pretend not to see the run's file system?"""
        return node in self.unshared_nodes

    def _crash(self, after: int | None, count: int, what: str) -> None:
        marker = self.crash_marker
        if after is None or count <= after or not marker or os.path.exists(marker):
            return
        open(marker, "w").close()
        log.warning("fault plan: %s pid %d exiting after %d", what, os.getpid(), after)
        os._exit(1)
