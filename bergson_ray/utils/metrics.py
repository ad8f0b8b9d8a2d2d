"""Throughput, progress and exactly-once accounting of one pipeline stage.

:class:`StageMonitor` sees every output batch the driver receives (``stream`` in
``pipelines/common.py`` feeds it) and

* counts rows, tokens and bytes, per stage and per node;
* exports them as Ray metrics (``ray.util.metrics``), which Ray's metrics agent serves
  to Prometheus and the dashboard's Metrics tab (names get Ray's ``ray_`` prefix:
  ``ray_bergson_ray_rows_total``, ``ray_bergson_ray_tokens_per_second`` ...);
* puts rows/s and tokens/s on the CLI's progress bar;
* keeps a received-rows bitmap, so a row delivered twice (or never) is noticed instead
  of silently overwritten;
* returns a summary (rows, tokens, seconds, bytes) that the pipelines merge into the
  run's ``summary.json``.

Metrics are best effort: without Ray (or outside a Ray process) they are skipped.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any

import numpy as np

from .ray_env import ray_running

log = logging.getLogger(__name__)

PREFIX = "bergson_ray"
RATE_WINDOW_S = 10.0
"""Rates on the progress bar and in the gauges are averaged over this many seconds."""


class _RayMetrics:
    """The Ray counters/gauges of one stage (created lazily, only inside a Ray process)."""

    def __init__(self, stage: str, run: str):
        from ray.util.metrics import Counter as RCounter
        from ray.util.metrics import Gauge

        keys = ("stage", "run")
        self.tags = {"stage": stage, "run": run}
        self.rows = RCounter(f"{PREFIX}_rows", "rows (documents) finished", tag_keys=keys)
        self.tokens = RCounter(f"{PREFIX}_tokens", "tokens processed", tag_keys=keys)
        self.rows_per_s = Gauge(f"{PREFIX}_rows_per_second", "rows/s, last 10 s", tag_keys=keys)
        self.tokens_per_s = Gauge(
            f"{PREFIX}_tokens_per_second", "tokens/s, last 10 s", tag_keys=keys
        )
        self.progress = Gauge(f"{PREFIX}_progress", "fraction of rows done (0..1)", tag_keys=keys)

    def record(self, rows: int, tokens: int, rate_rows: float, rate_tokens: float, done: float):
        if rows:
            self.rows.inc(rows, tags=self.tags)
        if tokens:
            self.tokens.inc(tokens, tags=self.tags)
        self.rows_per_s.set(rate_rows, tags=self.tags)
        self.tokens_per_s.set(rate_tokens, tags=self.tags)
        self.progress.set(done, tags=self.tags)


def _ray_metrics(stage: str, run: str) -> _RayMetrics | None:
    if not ray_running():  # an in-process run: no metrics agent to report to
        return None
    try:
        return _RayMetrics(stage, run)
    except Exception as err:  # noqa: BLE001 - metrics must never break a run
        log.debug("Ray metrics unavailable: %s", err)
        return None


def node_key(node_id: str) -> int:
    """A Ray node id as an int (its first 15 hex digits): tagging every output row with
    it costs 8 bytes instead of the id's 56 characters."""
    try:
        return int(node_id[:15], 16)
    except ValueError:
        return 0


def _node_names() -> dict:
    """``{node_key: node id}`` for the nodes Ray knows (dead ones included)."""
    if not ray_running():
        return {}
    try:
        import ray

        return {node_key(n["NodeID"]): n["NodeID"] for n in ray.nodes()}
    except Exception as err:  # noqa: BLE001 - accounting must never break a run
        log.debug("node names unavailable: %s", err)
    return {}


class StageMonitor:
    """Accounting for one stage. ``num_items`` sizes the exactly-once bitmap.

    ``update(batch)`` takes a worker output batch: ``idx`` (row ids), optionally
    ``length`` (tokens per row) and ``node`` (the node that computed it: a
    :func:`node_key`, or its name). It also counts the bytes each batch carried to the
    driver (``driver_bytes_per_row`` in the summary).
    """

    def __init__(self, stage: str, total: int, num_items: int | None = None, run: str = ""):
        self.stage = stage
        self.total = int(total)
        self.t0 = time.perf_counter()
        self.rows = 0
        self.tokens = 0
        self.duplicates = 0
        self.compute_seconds = 0.0
        """Seconds workers spent inside their batches (excludes start-up and queueing)."""
        self.per_node: Counter = Counter()
        self.driver_bytes = 0
        """Bytes of the output batches that reached the driver (rows, bookkeeping)."""
        self.seen = np.zeros(int(num_items if num_items is not None else total), dtype=bool)
        self._window: list[tuple[float, int, int]] = [(self.t0, 0, 0)]
        self._first: tuple[float, int, int] | None = None
        """(time, rows, tokens) at the first batch: steady-state rates exclude start-up."""
        self._metrics = _ray_metrics(stage, run)
        self.t0_wall = time.time()
        self.first_wall: float | None = None
        """When the first output batch (a whole window) reached the driver."""
        self.first_grad_wall: float | None = None
        """When a worker finished its first packed batch's gradients (from its report)."""
        self.ray_seconds = 0.0
        """Set by the pipeline to what ``init_ray`` took (start-up breakdown)."""
        self.worker_setup = 0.0
        """The slowest worker's set-up (model load, dataset open), from ``setup_s``."""
        self.executor = "ray"
        """``ray`` (a Ray actor pool) or ``process`` (one worker in the driver's process)."""
        self.per_worker: dict[int, list] = {}
        """worker key -> [rows, (time, tokens so far) at its first batch, ... at its last]."""
        self.spans: dict[int, list[tuple[float, float, int]]] = {}
        """worker key -> ``(start, done, tokens)`` of each of its windows, on its own wall
        clock (from ``done_wall`` and ``compute_s``)."""

    # -- feeding ---------------------------------------------------------------------
    def update(self, batch: dict[str, np.ndarray]) -> None:
        idx = np.asarray(batch["idx"], dtype=np.int64)
        rows = len(idx)
        tokens = int(np.asarray(batch["length"]).sum()) if "length" in batch else 0
        if len(self.seen) and rows:
            fresh = ~self.seen[idx]
            self.duplicates += int(rows - fresh.sum())
            # a duplicate inside one batch also counts
            self.duplicates += int(fresh.sum() - len(np.unique(idx[fresh])))
            self.seen[idx] = True
        if "node" in batch:
            nodes, counts = np.unique(np.asarray(batch["node"]), return_counts=True)
            for node, c in zip(nodes.tolist(), counts.tolist()):
                self.per_node[node] += c
        self.driver_bytes += sum(_nbytes(v) for v in batch.values())
        self.rows += rows
        self.tokens += tokens
        if "compute_s" in batch:
            self.compute_seconds += float(np.asarray(batch["compute_s"]).sum())
        if "setup_s" in batch and rows:
            self.worker_setup = max(self.worker_setup, float(np.asarray(batch["setup_s"]).max()))
        worker_wall = 0.0
        if "first_grad_wall" in batch and rows:
            worker_wall = float(np.asarray(batch["first_grad_wall"]).max())
        if worker_wall > 0:  # a worker's first output: when its first gradients were done
            # Its own clock, not receipt minus a lag: Ray Data hands a worker's output over
            # a whole input block at a time, seconds after the first batch in it. Never
            # later than now (a node's clock may run ahead).
            first_grad = min(worker_wall, time.time())
            self.first_grad_wall = min(self.first_grad_wall or first_grad, first_grad)
        now = time.perf_counter()
        if "worker" in batch and rows:
            workers, counts = np.unique(np.asarray(batch["worker"]), return_counts=True)
            for w, c in zip(workers.tolist(), counts.tolist()):
                seen = self.per_worker.setdefault(w, [0, (now, self.tokens), None])
                seen[0] += c
                seen[2] = (now, self.tokens)
        if "done_wall" in batch and "compute_s" in batch and "worker" in batch and rows:
            self._add_spans(batch)
        if self._first is None:
            self._first = (now, self.rows, self.tokens)
            self.first_wall = time.time()
        self._last = now
        self._window.append((now, self.rows, self.tokens))
        while len(self._window) > 2 and now - self._window[0][0] > RATE_WINDOW_S:
            self._window.pop(0)
        if self._metrics is not None:
            r, t = self.rates()
            try:
                self._metrics.record(rows, tokens, r, t, self.rows / max(self.total, 1))
            except Exception as err:  # noqa: BLE001
                log.debug("metrics: %s", err)
                self._metrics = None

    def _add_spans(self, batch: dict[str, np.ndarray]) -> None:
        """Each window in ``batch`` (its rows share a worker and a ``done_wall``) as a
        busy span: it ended at ``done_wall`` after the sum of its rows' ``compute_s``."""
        worker = np.asarray(batch["worker"])
        done = np.asarray(batch["done_wall"], dtype=np.float64)
        busy = np.asarray(batch["compute_s"], dtype=np.float64)
        length = np.asarray(batch["length"]) if "length" in batch else np.zeros(len(worker))
        for w in np.unique(worker).tolist():
            mine = worker == w
            for d in np.unique(done[mine]).tolist():
                window = mine & (done == d)
                span = (d - float(busy[window].sum()), d, int(length[window].sum()))
                self.spans.setdefault(w, []).append(span)

    # -- reading ---------------------------------------------------------------------
    def rates(self) -> tuple[float, float]:
        """(rows/s, tokens/s) over the last ``RATE_WINDOW_S`` seconds."""
        (t_a, r_a, k_a), (t_b, r_b, k_b) = self._window[0], self._window[-1]
        dt = max(t_b - t_a, 1e-9)
        return (r_b - r_a) / dt, (k_b - k_a) / dt

    def postfix(self) -> dict[str, str]:
        r, t = self.rates()
        return {"rows/s": f"{r:.1f}", "tok/s": f"{t:.0f}"}

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def summary(self) -> dict[str, Any]:
        """What the stage did, for ``summary.json``."""
        s = max(self.seconds, 1e-9)
        out: dict[str, Any] = {
            "executor": self.executor,
            "rows_received": self.rows,
            "duplicate_rows": self.duplicates,
            "stage_tokens": self.tokens,
            "stage_seconds": round(self.seconds, 3),
            "stage_rows_per_second": round(self.rows / s, 2),
            "stage_tokens_per_second": round(self.tokens / s, 1),
        }
        if self._first is not None:
            t1, r1, k1 = self._first
            out["startup_seconds"] = round(t1 - self.t0, 3)
            if self._last > t1:  # after the first batch: workers up, models loaded
                out["steady_tokens_per_second"] = round((self.tokens - k1) / (self._last - t1), 1)
                out["steady_rows_per_second"] = round((self.rows - r1) / (self._last - t1), 2)
        out.update(self.all_busy())
        if self.compute_seconds > 0:
            out["worker_compute_seconds"] = round(self.compute_seconds, 3)
            out["compute_tokens_per_second_per_worker"] = round(self.tokens / self.compute_seconds, 1)
        if self.first_wall is not None:
            out["startup"] = self.startup()
        if self.rows:
            out["driver_bytes_per_row"] = round(self.driver_bytes / self.rows, 1)
        if self.per_node:
            if self.executor == "process":
                names = {k: "driver" for k in self.per_node}
            else:
                keyed = any(isinstance(k, int) for k in self.per_node)
                names = _node_names() if keyed else {}
            named = {str(names.get(k, k)): c for k, c in self.per_node.items()}
            out["rows_per_node"] = dict(sorted(named.items()))
        return out


    def all_busy(self) -> dict[str, Any]:
        """Throughput while every worker was running, and how the rows were shared.

        The steady rate above runs from the first batch to the last, so it also counts a
        worker still starting while another already works, and the tail where one
        finished early. Here the interval runs from the last worker's first batch to the
        first worker's last, the tokens delivered in between (all workers busy), so that
        one and N workers compare like for like (``benchmarks/scaling.py``). Workers that
        report when each window was done (``done_wall``) are placed on their own clocks
        (:func:`busy_overlap_rate`); otherwise the driver's receipt times stand in, which
        move by a window at either end of the interval.
        """
        if not self.per_worker:
            return {}
        rows = sorted(r for r, _, _ in self.per_worker.values())
        out: dict[str, Any] = {"workers_seen": len(rows), "rows_per_worker_min_max": [rows[0], rows[-1]]}
        if self.spans.keys() == self.per_worker.keys():  # every worker said when it was busy
            return {**out, **busy_overlap_rate(self.spans)}
        (t1, k1) = max(first for _, first, _ in self.per_worker.values())
        (t2, k2) = min(last for _, _, last in self.per_worker.values())
        if t2 > t1 and k2 > k1:
            out["all_busy_tokens_per_second"] = round((k2 - k1) / (t2 - t1), 1)
            out["all_busy_seconds"] = round(t2 - t1, 3)
        return out

    def startup(self) -> dict[str, float]:
        """Where the time before the first batch went (seconds): process start to this
        stage (interpreter, imports, config, dataset open, layout planning), Ray's
        start or connection, the workers until the first batch came back (actor start,
        imports, model load, first batch), inside that the slowest worker's set-up,
        and the total from process start to the first gradients: the first packed batch
        a worker finished, or (when no worker reported one) the first window back."""
        start = _process_start()
        first = self.first_wall if self.first_wall is not None else time.time()
        first_grad = self.first_grad_wall if self.first_grad_wall is not None else first
        out = {
            "process_to_stage_s": self.t0_wall - start,
            "ray_start_s": self.ray_seconds,
            "workers_to_first_batch_s": first - self.t0_wall - self.ray_seconds,
            "worker_setup_s": self.worker_setup,
            "first_gradient_s": first_grad - start,
        }
        return {k: round(max(v, 0.0), 3) for k, v in out.items()}


def busy_overlap_rate(spans: dict[int, list[tuple[float, float, int]]]) -> dict[str, float]:
    """Tokens/s from the last worker's first busy moment to the first worker's last, from
    each window's ``(start, done, tokens)`` on its worker's clock.

    A window partly inside that interval counts the share of its tokens its busy time
    there gives (a window runs at an even pace), so the figure does not jump by a window's
    tokens when a window ends just inside or outside the interval, as counting windows on
    receipt does, and a worker idle between windows lowers it as it should. Empty when the
    workers were never all busy at once.
    """
    t1 = max(min(s for s, _, _ in windows) for windows in spans.values())
    t2 = min(max(d for _, d, _ in windows) for windows in spans.values())
    if t2 <= t1:
        return {}
    tokens = 0.0
    for windows in spans.values():
        for start, done, n in windows:
            if done > start:
                tokens += n * max(0.0, min(done, t2) - max(start, t1)) / (done - start)
            elif t1 <= done <= t2:
                tokens += n
    return {"all_busy_tokens_per_second": round(tokens / (t2 - t1), 1), "all_busy_seconds": round(t2 - t1, 3)}


def _process_start() -> float:
    """This process's start as a wall-clock time, to the kernel's 10 ms tick.

    ``psutil``'s ``create_time`` adds the start tick to the boot time, which Linux gives
    in whole seconds: up to a second off, as much as the start-up target's margin. On
    Linux the process's age is read against the same clock the tick counts on.
    """
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start, in ticks
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - accounting must never break a run
        return time.time()


def _nbytes(col) -> int:
    """Bytes of one output column (ragged object columns: their parts' bytes)."""
    arr = np.asarray(col)
    if arr.dtype == object:
        return int(sum(np.asarray(x).nbytes for x in arr))
    return int(arr.nbytes)


def dir_bytes(path) -> int:
    """Total size of the files under ``path`` (what a run wrote)."""
    import os

    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
