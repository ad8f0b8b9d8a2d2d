"""``hessian``: KFAC / TKFAC / Shampoo (+ EK-FAC) or dense autocorrelation Hessians on Ray.

Data path::

    windows of row indices ─► HessianWorker actors: read, tokenize, pack, forward/backward,
                              sum the statistics locally over *all* their windows
                           ─► one pre-summed contribution per (worker, shard)
                           ─► HessianShard actors: own disjoint module sets, merge,
                              eigendecompose in parallel, write their row blocks

Traffic is ``workers x total factor size`` per pass whatever the number of
batches (bergson all-reduces every module's update on every batch); shard memory
is about ``total / K``. Worker count and shard count are independent, and the
results depend on neither: sums commute, labels are sampled per document.

Faults. A dead worker's windows are re-queued on a replacement; its sums count
only if it handed them over whole. Every contribution routed to a shard is kept
as a driver-owned object ref (it outlives the shard) until the files are
written, so a dead shard is replaced and replayed up to ``max_shard_restarts``
times; past that the run fails with :class:`StoreError` and nothing is
committed. Before writing, each shard's merged contributions and counts are
checked against what the workers reported: partial factors are never written.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError, BergsonRayError, StoreError, unwrap
from ..hessians.config import HessianRunConfig
from .build import as_config
from .common import configure_data_context, worker_pool

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 2
"""Windows queued per worker (one running, one waiting) so a worker never idles."""
DEFAULT_MAX_SHARDS = 4


def validate(cfg: HessianRunConfig) -> None:
    if not cfg.run.run_path:
        raise BadInputError("run_path is required")
    if cfg.run.resume:
        raise BadInputError("hessian keeps its sums in memory and cannot --resume; rerun it")
    if cfg.batch.token_batch_size <= 1:
        raise BadInputError("token_batch_size must be > 1")
    if cfg.grad.loss_fn != "ce":
        raise BadInputError("hessian supports loss_fn 'ce' only")
    cfg.hessian.validate(cfg.grad)


def _meta_model(model_cfg):
    """The model skeleton on the meta device: module names and shapes, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..gradients.model_loading import resolve_model_name

    name = resolve_model_name(model_cfg.model)
    try:
        hf_cfg = AutoConfig.from_pretrained(name, revision=model_cfg.revision)
    except (OSError, ValueError) as err:
        raise BadInputError(f"could not load model config for {model_cfg.model!r}: {err}") from err
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_cfg)


def plan_modules(cfg: HessianRunConfig) -> tuple[dict[str, Any], dict[str, float]]:
    """``(module -> ModuleSpec or block width, module -> eigendecomposition cost)``."""
    if cfg.hessian.factored:
        from ..hessians.fitter import module_specs

        specs = module_specs(_meta_model(cfg.model), cfg.grad)
        return specs, {n: float(s.factor_cost) for n, s in specs.items()}
    from .common import plan_layout

    sizes = plan_layout(cfg.model, cfg.grad).grad_sizes
    return dict(sizes), {n: float(d) ** 3 for n, d in sizes.items()}


def plan_shards(cfg: HessianRunConfig, costs: dict[str, float]) -> list[list[str]]:
    from ..hessians.assign import assign_modules

    k = cfg.hessian.num_shards or min(DEFAULT_MAX_SHARDS, len(costs))
    if k > len(costs):
        log.warning("%d shards for %d modules: using %d", k, len(costs), len(costs))
        k = len(costs)
    return assign_modules(costs, k)


def index_windows(n: int, window: int) -> list[np.ndarray]:
    return [
        np.arange(lo, min(lo + window, n), dtype=np.int64) for lo in range(0, n, max(1, window))
    ]


class ShardedFit:
    """Driver-side coordination of worker and shard actors for one Hessian fit."""

    def __init__(
        self,
        cfg: HessianRunConfig,
        modules: dict[str, Any],
        owners: list[list[str]],
        num_documents: int,
        chaos: dict | None = None,
    ):
        import ray

        from ..actors.hessian_shard import HessianShard, HessianWorker
        from ..gradients.runner import RunnerSpec
        from ..hessians.runner import HessianSpec

        self.ray = ray
        self.cfg = cfg
        self.modules = modules
        self.owners = owners
        self.num_documents = num_documents
        self.chaos = dict(chaos or {})
        self.pool = worker_pool(cfg.ray)
        self._shard_cls, self._worker_cls = HessianShard, HessianWorker
        self.spec = HessianSpec(
            runner=RunnerSpec(
                model=cfg.model,
                grad=cfg.grad,
                data=cfg.data,
                batch=cfg.batch,
                skip_short_docs=cfg.skip_short_docs,
                device=self.pool.device,
            ),
            hessian=cfg.hessian,
        )
        # K shards eigendecompose in parallel beside the workers: split the node's CPUs,
        # never oversubscribe. Multi-threaded LAPACK on busy cores spins (512x512 fp64
        # eigh here: 0.09 s on 1 thread, 2.1 s on 2 threads while the cores are busy).
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
        self.keep_refs = cfg.hessian.max_shard_restarts > 0
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

    def chaos_point(self, stage: str) -> None:
        """Test hook: kill shard ``kill_shard`` when the run reaches ``kill_shard_at``."""
        if self.chaos.get("kill_shard_at") == stage and not self.chaos.get("_killed"):
            k = int(self.chaos.get("kill_shard", 0))
            log.warning("chaos: killing Hessian shard %d at stage %r", k, stage)
            self.ray.kill(self.shards[k], no_restart=True)
            self.chaos["_killed"] = True

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
        from ray.exceptions import RayActorError

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
        ).remote(self.spec, self.pool.torch_threads, self.chaos.get("worker"))
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
        from ray.exceptions import RayActorError

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
                self.chaos_point("accumulate")

    def _hand_over(self, kind: str, done, stats, todo) -> None:
        """Take every busy worker's sums; a worker that died first has its windows re-queued."""
        from ray.exceptions import RayActorError

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
        self.chaos_point(f"merge_{kind}")
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
        self.chaos_point("finalize")
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
        from ray.exceptions import RayActorError

        try:
            self.ray.get(self.shards[k].ping.remote())
            return True
        except RayActorError:
            return False

    def write_factored(self, root: Path) -> None:
        """File ``r`` of every subdir, written by shard ``r`` from all shards' row blocks.

        Row blocks travel shard to shard as driver-owned refs (the driver never
        holds the factors); they outlive a shard that dies after exporting.
        """
        self.chaos_point("write")
        k = len(self.shards)
        for _attempt in range(self.cfg.hessian.max_shard_restarts + 2):
            exports = []
            for s in self.shards:
                refs = s.export.options(num_returns=k).remote(k)
                exports.append([refs] if k == 1 else list(refs))
            flat = [r for e in exports for r in e]
            self.ray.wait(flat, num_returns=len(flat), fetch_local=False)
            dead = [j for j in range(k) if not self._alive(j)]
            if dead:
                for j in dead:
                    self._replace_shard(j, "exporting factors")
                continue
            calls = [
                (
                    r,
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


def hessian(
    cfg: HessianRunConfig | dict | None = None, *, _chaos: dict | None = None, **overrides
) -> Path:
    """Fit a Hessian approximation; returns the finished run directory.

    ``bergson_ray.hessian(run_path="runs/h", method="kfac", ev_correction=True)``
    """
    import ray  # noqa: F401  (fail early if Ray is missing)

    from ..data.loading import check_columns, load_dataset_rows
    from ..store.processor import ProcessorConfig, save_processor, write_total_processed
    from ..store.run_dir import RunDir
    from ..utils.ray_env import init_ray

    cfg = as_config(HessianRunConfig, cfg, **overrides)
    validate(cfg)
    t0 = time.perf_counter()
    ds = load_dataset_rows(cfg.data)
    check_columns(ds.column_names, cfg.data)
    n = len(ds)
    if n == 0:
        raise BadInputError(f"dataset {cfg.data.dataset!r} (split {cfg.data.split!r}) is empty")
    modules, costs = plan_modules(cfg)
    owners = plan_shards(cfg, costs)
    run = RunDir(cfg.run.run_path, overwrite=cfg.run.overwrite)
    part = Path(run.part)
    log.info(
        "hessian %s: %d documents, %d modules on %d shards",
        cfg.hessian.method,
        n,
        len(modules),
        len(owners),
    )
    init_ray(cfg.ray.address, namespace=cfg.ray.namespace)
    configure_data_context()
    fit = ShardedFit(cfg, modules, owners, n, chaos=_chaos)
    windows = index_windows(n, cfg.ray.window_size)
    try:
        fit.start_workers()
        fit.run_pass("factors", windows)
        fit.verify("factors")
        eig_seconds = fit.finalize()
        if cfg.hessian.ev_correction:
            fit.start_correction()
            fit.run_pass("correction", windows)
            fit.verify("correction")
            fit.finalize_correction()
        fit.stop_workers()
        positions = fit.reported["factors"].get("positions", 0)
        if cfg.hessian.factored:
            fit.write_factored(part)
        else:
            parts = fit.on_shards("dense", what="collecting dense Hessians")
            hessians = {k: v for h, _ in parts for k, v in h.items()}
            eigen = {k: v for _, e in parts for k, v in e.items()}
            save_processor(
                part,
                ProcessorConfig.from_gradient_config(cfg.grad),
                hessians={m: hessians[m] for m in modules},
                hessians_eigen={m: eigen[m] for m in modules},
            )
        memory = fit.memory()
    finally:
        fit.shutdown()
    write_total_processed(part, positions)
    from ..hessians.factored_io import write_info

    write_info(
        part,
        {
            "format": "factored (bergson sharded safetensors)"
            if cfg.hessian.factored
            else "dense processor",
            "method": cfg.hessian.method,
            "ev_correction": cfg.hessian.ev_correction,
            "hessian_dtype": cfg.hessian.hessian_dtype,
            "use_dataset_labels": cfg.hessian.use_dataset_labels,
            "num_documents": n,
            "total_processed": positions,
            "num_shards": len(owners),
            "scale": "eigenvalue grids are per-document means: (N/D) lambda_G lambda_A^T and sum_n (Q_G^T G_n Q_A)^2 / D",
            "modules": {
                m: [s.out_features, s.in_dim] if cfg.hessian.factored else [s, s]
                for m, s in modules.items()
            },
            "owners": owners,
        },
    )
    run.write_config(cfg, command="hessian")
    run.write_summary(
        {
            "command": "hessian",
            "method": cfg.hessian.method,
            "ev_correction": cfg.hessian.ev_correction,
            "documents": n,
            "positions": positions,
            "workers": fit.pool.size,
            "shards": len(owners),
            "shard_restarts": fit.shard_restarts,
            "seconds": round(time.perf_counter() - t0, 3),
            **fit.timings,
            "eigendecomposition_module_s": {m: round(s, 4) for m, s in eig_seconds.items()},
            "shard_memory": memory,
            "worker_stats": fit.reported,
        }
    )
    return Path(run.commit())
