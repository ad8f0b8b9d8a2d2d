"""The one Ray Data class UDF: row indices in, rows / partial sums / scores out.

``build``, ``reduce`` and ``score`` all run ``ds.map_batches(BatchWorker, ...)``
(``pipelines/placement.py: map_workers``). What differs is composed from two small
strategy objects passed in the constructor kwargs:

* the **output** — :class:`StoredRows` (the worker writes its gradient rows into the
  store itself; only bookkeeping goes back), :class:`PartialSums`
  (an fp64 sum per batch pushed to the reducer actor; only counts go back) or
  :class:`Scores` (rows scored against a query bank fetched once; only scores go back);
* the **runner** — :class:`~bergson_ray.runners.gradient_runner.OneProcess` (the model
  in this process, one per GPU or CPU slot) or
  :class:`~bergson_ray.runners.sharded.GroupPlan` (this worker leads an FSDP group).

Every worker also re-checks, on its own node, that it sees the run directory
(autoscaled nodes join after the driver's up-front check), turns user errors, at
start-up or per batch, into an ``error`` column the driver re-raises, and tags each
output row with its node id (``rows_per_node`` in the summary). Ray Data restarts a
crashed worker and re-runs the batches it lost: every row is computed and written (a
re-run writes the same bytes again) and the driver counts each row once.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BergsonRayError, encode_error
from ..utils.ray_env import node_id, ray_running

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ outputs
class Rows:
    """Per-document gradient rows (``grads``) back to the driver (the base output)."""

    def setup(self) -> None:
        pass

    def compute(self, runner, idx: np.ndarray) -> dict[str, np.ndarray]:
        return runner.gradients(idx)

    def deliver(self, out: dict[str, np.ndarray]) -> None:
        pass


@dataclass
class StoredRows(Rows):
    """Gradient rows written by the worker itself into the run's store, for ``build``.

    Only bookkeeping (index, loss, length, node, timing: tens of bytes per row) goes
    back to the driver, which flags the rows written; the rows are durable before the
    batch returns (``store/row_sink.py``). Every node sees the store: the storage probe
    each worker runs at start-up proves it.
    """

    store: str
    """The store directory (the run's ``.part``), created by the driver."""

    def setup(self) -> None:
        from ..store.row_sink import RowSink

        self.sink = RowSink(self.store)

    def compute(self, runner, idx: np.ndarray) -> dict[str, np.ndarray]:
        if not getattr(runner, "streams_rows", False):
            return runner.gradients(idx)
        # each packed batch's rows go to the store as they are made: no window buffer
        idx = np.asarray(idx, dtype=np.int64)

        def write(pos: np.ndarray, rows: np.ndarray, counts: np.ndarray | None) -> None:
            if counts is None:
                self.sink.write_rows(idx[pos], rows)
            else:
                self.sink.write_items(idx[pos], rows, counts)

        return runner.gradients(idx, sink=write)

    def deliver(self, out: dict[str, np.ndarray]) -> None:
        if "grads" not in out:  # written batch by batch in compute
            self.sink.sync()
            return
        grads = out.pop("grads")
        if "token_count" in out:  # per-token: one [count, D] array per document
            parts = [np.asarray(g).reshape(-1, self.sink.info.total_dim) for g in grads]
            rows = np.concatenate(parts) if parts else grads
            self.sink.write_items(out["idx"], rows, out["token_count"])
        else:
            self.sink.write_rows(out["idx"], grads)
        self.sink.sync()


@dataclass
class PartialSums(Rows):
    """One fp64 partial sum per batch, pushed to the reducer actor, for ``reduce``."""

    reducer: Any
    """A :class:`~bergson_ray.actors.reducer.Reducer` handle (a local one, from
    ``local_handles.py``, in an in-process run)."""

    def compute(self, runner, idx: np.ndarray) -> dict[str, np.ndarray]:
        return runner.partial_sum(idx)

    def deliver(self, out: dict[str, np.ndarray]) -> None:
        from .local_handles import get

        # Synchronous: the batch only counts as done once the reducer holds its sum.
        get(self.reducer.add.remote(out["idx"], out.pop("sum")))


@dataclass
class Scores(Rows):
    """Rows scored at once against a shared query bank, for ``score``.

    The driver puts the query matrix in the object store once; each worker fetches it
    once at start-up (never per batch). Gradients never leave the worker.
    """

    query_ref: Any
    """Object ref of the ``[Q, D]`` float32 query matrix (a ref inside an object stays a
    ref: Ray does not copy it into every constructor call)."""
    mode: str
    query_batch_size: int | None = None

    def setup(self) -> None:
        import torch

        value = self.query_ref
        if ray_running():  # in the driver's process it is the array itself
            import ray

            value = ray.get(value) if isinstance(value, ray.ObjectRef) else value
        # object-store arrays are read-only views; torch wants memory it may own
        self.query = torch.from_numpy(np.array(value, dtype=np.float32))

    def compute(self, runner, idx: np.ndarray) -> dict[str, np.ndarray]:
        return runner.scores(idx, self.query, self.mode, self.query_batch_size)


# ------------------------------------------------------------------------------- worker
class BatchWorker:
    """``ds.map_batches(BatchWorker, fn_constructor_kwargs=dict(spec=..., output=...,
    runner=..., probe=..., faults=...))``."""

    def __init__(self, spec, output: Rows, runner, probe=None, faults=None):
        t0 = time.perf_counter()
        self.output = output
        self.faults = faults
        from ..utils.metrics import node_key

        self.node = node_id()
        self.node_key = node_key(self.node)
        self.worker_key = secrets.randbits(31)
        """This worker among the pool's (and their replacements): the driver's per-worker
        accounting (``all_busy_tokens_per_second``, ``rows_per_worker_min_max``)."""
        self.batches = 0
        self.init_error: str | None = None
        self.setup_s = 0.0
        """Model load and set-up, reported once with the first batch (summary.json)."""
        try:
            if probe is not None:  # a pipelines.storage.Probe
                probe.verify(blind=faults is not None and faults.hides_storage(self.node))
            self.runner = runner.build(spec)
            output.setup()
            self.setup_s = time.perf_counter() - t0
        except BergsonRayError as err:
            # Raised from __init__, Ray reports only "actor died in its creation task";
            # as an error column the driver re-raises the user's own message.
            log.error("worker start-up failed: %s", err)
            self.init_error = encode_error(err)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        idx = np.asarray(batch["idx"])
        if self.init_error is not None:
            return {"idx": idx, "error": np.array([self.init_error] * len(idx))}
        self.batches += 1
        out = guarded(lambda i: self.output.compute(self.runner, i), idx)
        done = time.time()  # the end of the busy time compute_s measures (delivery apart)
        if "error" not in out:
            self.output.deliver(out)
        if self.faults is not None:
            self.faults.after_batch(self.batches, self.node)  # test hook: the one seam
        out["node"] = np.full(len(out["idx"]), self.node_key, dtype=np.int64)
        out["worker"] = np.full(len(out["idx"]), self.worker_key, dtype=np.int32)
        # when this window was done, on this worker's clock: with compute_s it places the
        # window's busy span, so the driver can tell when every worker was busy
        out["done_wall"] = np.full(len(out["idx"]), done, dtype=np.float64)
        out["setup_s"] = np.zeros(len(out["idx"]), dtype=np.float32)
        out["first_grad_wall"] = np.zeros(len(out["idx"]), dtype=np.float64)
        if self.batches == 1 and len(out["idx"]):
            out["setup_s"][0] = self.setup_s
            first = getattr(self.runner, "first_batch_wall", None)
            if first is not None:  # when this worker's first gradients were done (its clock)
                out["first_grad_wall"][0] = first
        return out


def guarded(fn, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Run ``fn(idx)``; a user error becomes an ``error`` column the driver re-raises.

    Ray Data re-wraps exceptions from UDFs and drops the original's type, so the
    user would otherwise get a Ray traceback instead of one clear sentence.
    """
    try:
        t0 = time.perf_counter()
        out = fn(idx)
        # busy time per row: the driver sums it into the run's compute throughput
        per_row = (time.perf_counter() - t0) / max(len(idx), 1)
        out["compute_s"] = np.full(len(idx), per_row, dtype=np.float32)
        return out
    except BergsonRayError as err:
        return {"idx": np.asarray(idx), "error": np.array([encode_error(err)] * len(idx))}
