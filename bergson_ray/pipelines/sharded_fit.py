"""Driver-side coordination of one sharded Hessian fit (``hessian`` / ``ekfac``).

:class:`ShardedFit` starts the :class:`~bergson_ray.actors.hessian_shard.HessianWorker`
and :class:`~bergson_ray.actors.hessian_shard.HessianShard` actors, deals windows of
row indices to the workers, routes each worker's pre-summed contribution to the shards
that own its modules, and drives the shards through finalize / EK-FAC correction /
write. See ``pipelines/hessian.py`` for the data path and the fault model: a dead
worker's windows are re-queued on a replacement; every contribution is kept as a
driver-owned object ref so a dead shard is replaced and replayed (up to
``max_shard_restarts``), and shards are checked against the workers' counts before
anything is written.

Given an in-process pool plan (``workers.start_workers``), the same classes run as plain objects in this
process through ``actors/local_handles.py`` (one worker, the shards one after the
other, no Ray): the same windows in the same order as a one-worker Ray pool.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import HessianRunConfig
from ..errors import BergsonRayError, StoreError, unwrap
from ..testing.faults import FaultPlan
from .workers import PoolPlan, worker_pool

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 2
"""Windows queued per worker (one running, one waiting) so a worker never idles."""


class ShardedFit:
    """Driver-side coordination of worker and shard actors for one Hessian fit."""

    def __init__(
        self,
        cfg: HessianRunConfig,
        modules: dict[str, Any],
        owners: list[list[str]],
        num_documents: int,
        faults: FaultPlan | None = None,
        rows=None,
        pool: PoolPlan | None = None,
    ):
        from ..actors import hessian_shard as actors
        from ..runners.gradient_runner import RunnerSpec
        from ..runners.hessian_runner import HessianSpec

        self.cfg = cfg
        self.modules = modules
        self.owners = owners
        self.num_documents = num_documents
        self.faults = faults
        self.killed_at: set[str] = set()  # test fault plan: stages where a shard was killed
        self.pool = pool or worker_pool(cfg.ray)
        local = self.pool.in_process
        if local:  # one worker and every shard in this process, no Ray
            from ..actors.local_handles import LocalClass, LocalRay

            self.ray = LocalRay()
            self._shard_cls = LocalClass(actors.HessianShard)
            self._worker_cls = LocalClass(actors.HessianWorker)
        else:
            import ray

            self.ray = ray
            self._shard_cls = actors.RemoteHessianShard
            self._worker_cls = actors.RemoteHessianWorker
        self.spec = HessianSpec(
            runner=RunnerSpec(
                model=cfg.model,
                grad=cfg.grad,
                data=cfg.data,
                batch=cfg.batch,
                skip_short_docs=cfg.skip_short_docs,
                device=self.pool.device,
                rows=rows,  # a RowPlan (--chunk_length / --max_tokens) or None
            ),
            hessian=cfg.hessian,
        )
        # K shards eigendecompose in parallel beside the workers: split the node's CPUs,
        # never oversubscribe. Multi-threaded LAPACK on busy cores spins (512x512 fp64
        # eigh here: 0.09 s on 1 thread, 2.1 s on 2 threads while the cores are busy).
        # In process, shards use the worker's threads one after the other (0: unchanged).
        self.shard_threads = 0
        if not local:
            from ..utils.ray_env import cluster_cpus

            self.shard_threads = max(1, int(cluster_cpus() // (len(owners) + self.pool.size)))
        self.shards = [self._new_shard(k) for k in range(len(owners))]
        self.shard_restarts = 0
        # Everything routed to each shard, as driver-owned refs, kept for replay.
        self.retained: dict[str, list[list[tuple[str, Any]]]] = {
            "factors": [[] for _ in owners],
            "correction": [[] for _ in owners],
        }
        self.expected: dict[str, set[str]] = {"factors": set(), "correction": set()}
        # With no replacements allowed there is nothing to replay: free each ref once merged.
        # In process a shard cannot die alone: nothing to keep either.
        self.keep_refs = cfg.hessian.max_shard_restarts > 0 and not local
        self.stages: set[str] = set()
        self.workers: list[Any] = []
        self.incarnation: list[int] = []
        self.eigen_refs: list[Any] = []
        self.reported: dict[str, dict[str, int]] = {"factors": {}, "correction": {}}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ shards
    def _new_shard(self, k: int):
        mods = {n: self.modules[n] for n in self.owners[k]}
        return self._shard_cls.remote(k, mods, self.cfg.hessian, self.shard_threads)

    def fault_point(self, stage: str) -> None:
        """Test hook (the driver's one seam): the fault plan may kill a shard here, once
        per stage."""
        k = None if self.faults is None else self.faults.shard_to_kill(stage)
        if k is not None and stage not in self.killed_at:
            log.warning("fault plan: killing Hessian shard %d at stage %r", k, stage)
            self.ray.kill(self.shards[k], no_restart=True)
            self.killed_at.add(stage)

    def _replace_shard(self, k: int, what: str) -> None:
        """A fresh actor for shard ``k``, replayed to the current stage from retained refs."""
        limit = self.cfg.hessian.max_shard_restarts
        if self.shard_restarts >= limit:
            raise StoreError(
                f"Hessian shard {k} (modules {', '.join(self.owners[k][:3])}, ...) died during "
                f"{what}; {self.shard_restarts} of {limit} allowed replacements used. Nothing "
                "was committed: rerun the command (raise --max_shard_restarts to tolerate more)."
            )
        self.shard_restarts += 1
        log.warning("Hessian shard %d died during %s: replacing it and replaying its data", k, what)
        shard = self._new_shard(k)
        refs = [shard.merge.remote(key, ref) for key, ref in self.retained["factors"][k]]
        if "finalize" in self.stages:
            refs.append(shard.finalize.remote(self.num_documents))
        if "correction" in self.stages:
            refs.append(shard.start_correction.remote())
            refs += [
                shard.merge_correction.remote(key, ref)
                for key, ref in self.retained["correction"][k]
            ]
        if "finalize_correction" in self.stages:
            refs.append(shard.finalize_correction.remote(self.num_documents))
        self.shards[k] = shard
        self.ray.get(refs)
        if self.eigen_refs:
            # Bases are recomputed identically (same sums, deterministic fp64 eigh);
            # fresh refs only matter for workers started from now on.
            self.eigen_refs[k] = shard.eigenbases.remote()

    def gather(self, calls: list[tuple[int, Callable[[Any], Any]]], what: str) -> list[Any]:
        """Issue ``fn(shard_k)`` for each ``(k, fn)`` and wait; replace dead shards and retry."""
        RayActorError = self.ray.exceptions.RayActorError

        results: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        while pending:
            refs = {i: calls[i][1](self.shards[calls[i][0]]) for i in pending}
            dead: set[int] = set()
            retry = []
            for i, ref in refs.items():
                try:
                    results[i] = self.ray.get(ref)
                except RayActorError:
                    dead.add(calls[i][0])
                    retry.append(i)
                except Exception as exc:  # noqa: BLE001
                    raise unwrap(exc) from None
            for k in sorted(dead):
                while True:
                    try:
                        self._replace_shard(k, what)
                        break
                    except RayActorError:
                        continue
            pending = retry
        return results

    def on_shards(self, method: str, *args, what: str) -> list[Any]:
        return self.gather(
            [(k, lambda s, m=method: getattr(s, m).remote(*args)) for k in range(len(self.shards))],
            what,
        )

    # ----------------------------------------------------------------- workers
    def _new_worker(self):
        w = self._worker_cls.options(
            num_cpus=self.pool.num_cpus, num_gpus=self.pool.num_gpus
        ).remote(self.spec, self.pool.torch_threads, self.faults)
        if "correction" in self.stages:
            w.start_correction.remote(*self.eigen_refs)
        return w

    def start_workers(self) -> None:
        self.workers = [self._new_worker() for _ in range(self.pool.size)]
        self.incarnation = [0] * len(self.workers)
        self.ray.get([w.ready.remote() for w in self.workers])

    def stop_workers(self) -> None:
        for w in self.workers:
            self.ray.kill(w)
        self.workers = []

    def _replace_worker(self, slot: int) -> None:
        log.warning("Hessian worker %d died: its windows run again on a replacement", slot)
        try:
            self.ray.kill(self.workers[slot])
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.incarnation[slot] += 1
        self.workers[slot] = self._new_worker()

    def run_pass(self, kind: str, windows: list[np.ndarray]) -> None:
        """Every window processed by a worker, every worker's sums merged by every shard."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        todo: deque[int] = deque(range(len(windows)))
        done: list[list[int]] = [[] for _ in self.workers]
        stats: list[dict[str, int]] = [{} for _ in self.workers]
        bar = tqdm(total=sum(len(w) for w in windows), desc=f"hessian {kind}", unit="doc")
        try:
            while todo:
                self._drain(kind, todo, windows, done, stats, bar)
                self._hand_over(kind, done, stats, todo)
        finally:
            bar.close()
        self.timings[f"{kind}_pass_s"] = round(time.perf_counter() - t0, 3)

    def _drain(self, kind, todo, windows, done, stats, bar) -> None:
        RayActorError = self.ray.exceptions.RayActorError

        inflight: dict[Any, tuple[int, int]] = {}
        while todo or inflight:
            for slot, w in enumerate(self.workers):
                mine = sum(1 for s, _ in inflight.values() if s == slot)
                for _ in range(MAX_IN_FLIGHT - mine):
                    if not todo:
                        break
                    win = todo.popleft()
                    inflight[w.process.remote(windows[win])] = (slot, win)
            (ref,), _ = self.ray.wait(list(inflight), num_returns=1)
            slot, win = inflight.pop(ref)
            try:
                out = self.ray.get(ref)
            except RayActorError:
                lost = [win] + [wn for s, wn in inflight.values() if s == slot] + done[slot]
                for r in [r for r, (s, _) in inflight.items() if s == slot]:
                    inflight.pop(r)
                bar.update(-sum(len(windows[i]) for i in done[slot]))
                todo.extendleft(sorted(set(lost), reverse=True))
                done[slot], stats[slot] = [], {}
                self._replace_worker(slot)
                continue
            except Exception as exc:
                err = unwrap(exc)
                if isinstance(err, BergsonRayError):
                    raise err from None
                raise
            done[slot].append(win)
            for key, val in out.items():
                stats[slot][key] = stats[slot].get(key, 0) + val
            bar.update(len(windows[win]))
            if kind == "factors" and sum(map(len, done)) == 1:
                self.fault_point("accumulate")

    def _hand_over(self, kind: str, done, stats, todo) -> None:
        """Take every busy worker's sums; a worker that died first has its windows re-queued."""
        RayActorError = self.ray.exceptions.RayActorError

        k = len(self.shards)
        handed: dict[int, list[Any]] = {}
        for slot, w in enumerate(self.workers):
            if not done[slot]:
                continue
            refs = w.contributions.options(num_returns=k).remote(self.owners)
            refs = [refs] if k == 1 else list(refs)
            try:
                # Wait without pulling the sums to the driver; the worker answering
                # afterwards proves the hand-over finished (actor calls run in order).
                self.ray.wait(refs, num_returns=len(refs), fetch_local=False)
                self.ray.get(w.ready.remote())
                handed[slot] = refs
            except RayActorError:
                todo.extend(done[slot])
                self._replace_worker(slot)
            done[slot] = []
        self.fault_point(f"merge_{kind}")
        merge = "merge" if kind == "factors" else "merge_correction"
        calls = []
        for slot, refs in handed.items():
            key = f"{kind}/worker{slot}.{self.incarnation[slot]}.{len(self.expected[kind])}"
            self.expected[kind].add(key)
            for shard_id, ref in enumerate(refs):
                if self.keep_refs:
                    self.retained[kind][shard_id].append((key, ref))
                calls.append(
                    (shard_id, lambda s, m=merge, a=key, r=ref: getattr(s, m).remote(a, r))
                )
            for name, val in stats[slot].items():
                self.reported[kind][name] = self.reported[kind].get(name, 0) + val
            stats[slot] = {}
        self.gather(calls, f"merging {kind}")

    # ------------------------------------------------------------------- stages
    def verify(self, kind: str) -> None:
        """Every shard merged every contribution and counts exactly what workers processed."""
        expected = sorted(self.expected[kind])
        merged = self.on_shards("merged", kind, what="checks")
        counts = self.on_shards("counts", kind, what="checks")
        rep = self.reported[kind]
        if kind == "correction":
            want = rep.get("sequences", 0)
        elif self.cfg.hessian.factored:
            want = rep.get("positions", 0)
        else:
            want = rep.get("rows", 0)
        for k, (keys, cnt) in enumerate(zip(merged, counts)):
            if sorted(keys) != expected:
                raise StoreError(
                    f"Hessian shard {k} merged {len(keys)} of {len(expected)} worker contributions; "
                    "refusing to write partial factors"
                )
            bad = {n: c for n, c in cnt.items() if c != want}
            if bad:
                raise StoreError(
                    f"Hessian shard {k} counted {bad} but the workers processed {want}; "
                    "refusing to write partial factors"
                )

    def finalize(self) -> dict[str, float]:
        self.fault_point("finalize")
        t0 = time.perf_counter()
        self.stages.add("finalize")
        per_shard = self.on_shards("finalize", self.num_documents, what="eigendecomposition")
        self.timings["eigendecomposition_s"] = round(time.perf_counter() - t0, 3)
        return {m: s for d in per_shard for m, s in d.items()}

    def start_correction(self) -> None:
        self.stages.add("correction")
        self.on_shards("start_correction", what="starting the EK-FAC pass")
        self.eigen_refs = [s.eigenbases.remote() for s in self.shards]
        self.ray.get([w.start_correction.remote(*self.eigen_refs) for w in self.workers])

    def finalize_correction(self) -> None:
        self.stages.add("finalize_correction")
        self.on_shards("finalize_correction", self.num_documents, what="EK-FAC correction")

    def _alive(self, k: int) -> bool:
        RayActorError = self.ray.exceptions.RayActorError

        try:
            self.ray.get(self.shards[k].ping.remote())
            return True
        except RayActorError:
            return False

    def write_factored(self, root: Path, num_files: int | None = None) -> None:
        """File ``r`` of every subdir, written by shard ``r`` from all shards' row blocks.

        Row blocks travel shard to shard as driver-owned refs (the driver never
        holds the factors); they outlive a shard that dies after exporting.
        ``num_files`` (default: one per shard) lets ``--module_partitions`` groups write
        as many files as the whole fit would; shard ``r % K`` writes file ``r``.
        """
        self.fault_point("write")
        k = num_files or len(self.shards)
        for _attempt in range(self.cfg.hessian.max_shard_restarts + 2):
            exports = []
            for s in self.shards:
                refs = s.export.options(num_returns=k).remote(k)
                exports.append([refs] if k == 1 else list(refs))
            flat = [r for e in exports for r in e]
            self.ray.wait(flat, num_returns=len(flat), fetch_local=False)
            dead = [j for j in range(len(self.shards)) if not self._alive(j)]
            if dead:
                for j in dead:
                    self._replace_shard(j, "exporting factors")
                continue
            calls = [
                (
                    r % len(self.shards),
                    lambda s, r=r, parts=[e[r] for e in exports]: s.write_file.remote(
                        str(root), r, *parts
                    ),
                )
                for r in range(k)
            ]
            self.gather(calls, "writing files")
            return
        raise StoreError("Hessian shards kept dying while writing; nothing was committed")

    def memory(self) -> list[dict[str, int]]:
        return self.on_shards("memory", what="memory report")

    def shutdown(self) -> None:
        self.stop_workers()
        for s in self.shards:
            self.ray.kill(s)
        self.shards = []
