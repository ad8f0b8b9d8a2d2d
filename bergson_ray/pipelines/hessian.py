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

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import HessianRunConfig, as_config
from ..data.length_order import longest_first
from ..errors import BadInputError
from ..testing.faults import FaultPlan
from .stages import meta_model, plan_rows
from .workers import PoolPlan, index_windows, start_workers

log = logging.getLogger(__name__)

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
    cfg.hessian.check_against(cfg.grad)


def plan_modules(cfg: HessianRunConfig) -> tuple[dict[str, Any], dict[str, float]]:
    """``(module -> ModuleSpec or block width, module -> eigendecomposition cost)``."""
    if cfg.hessian.factored:
        from ..hessians.fitter import module_specs

        specs = module_specs(meta_model(cfg.model), cfg.grad)
        return specs, {n: float(s.factor_cost) for n, s in specs.items()}
    from .stages import plan_layout

    sizes = plan_layout(cfg.model, cfg.grad).grad_sizes
    return dict(sizes), {n: float(d) ** 3 for n, d in sizes.items()}


def plan_shards(cfg: HessianRunConfig, costs: dict[str, float]) -> list[list[str]]:
    from ..hessians.assign import assign_modules

    k = cfg.hessian.num_shards or min(DEFAULT_MAX_SHARDS, len(costs))
    if k > len(costs):
        log.warning("%d shards for %d modules: using %d", k, len(costs), len(costs))
        k = len(costs)
    return assign_modules(costs, k)


def module_groups(cfg: HessianRunConfig, names: list[str]) -> list[list[str]]:
    """``--module_partitions``: the module groups fit one after the other (one group
    unless a factored method asks for more; bergson fits a dense Hessian in one pass)."""
    from ..hessians.partitions import partition_modules

    parts = cfg.hessian.module_partitions
    if parts > 1 and not cfg.hessian.factored:
        log.warning("--module_partitions applies to factored methods; %s fits in one pass",
                    cfg.hessian.method)
        parts = 1
    return partition_modules(names, parts)


@dataclasses.dataclass
class FitResult:
    """What one sharded fit reports for the run's info and summary."""

    positions: int
    eig_seconds: dict[str, float]
    memory: list[dict[str, int]]
    workers: int
    shard_restarts: int
    timings: dict[str, float]
    reported: dict[str, dict[str, int]]


def fit_modules(
    cfg: HessianRunConfig,
    modules: dict[str, Any],
    owners: list[list[str]],
    n: int,
    dest: Path,
    windows: list[np.ndarray],
    rows_plan,
    faults: FaultPlan | None,
    num_files: int | None = None,
    pool: PoolPlan | None = None,
) -> FitResult:
    """One sharded fit of ``modules`` over every window, written under ``dest``
    (``num_files`` factor files; default one per shard); ``pool``: the stage's
    worker pool plan (one worker in this process, or a Ray pool)."""
    import torch

    from ..store.processor import ProcessorConfig, save_processor
    from .sharded_fit import ShardedFit

    threads = torch.get_num_threads()  # an in-process worker sets its own; restored below
    fit = ShardedFit(cfg, modules, owners, n, faults=faults, rows=rows_plan, pool=pool)
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
            fit.write_factored(dest, num_files=num_files)
        else:
            parts = fit.on_shards("dense", what="collecting dense Hessians")
            hessians = {k: v for h, _ in parts for k, v in h.items()}
            eigen = {k: v for _, e in parts for k, v in e.items()}
            save_processor(
                dest,
                ProcessorConfig.from_gradient_config(cfg.grad),
                hessians={m: hessians[m] for m in modules},
                hessians_eigen={m: eigen[m] for m in modules},
            )
        memory = fit.memory()
    finally:
        fit.shutdown()
        torch.set_num_threads(threads)
    return FitResult(positions, eig_seconds, memory, fit.pool.size, fit.shard_restarts,
                     dict(fit.timings), fit.reported)


def hessian(
    cfg: HessianRunConfig | dict | None = None, *, faults: FaultPlan | None = None, **overrides
) -> Path:
    """Fit a Hessian approximation; returns the finished run directory.

    ``bergson_ray.hessian(run_path="runs/h", method="kfac", ev_correction=True)``
    """
    from ..data.loading import check_columns, load_dataset_rows
    from ..store.processor import write_total_processed
    from ..store.run_dir import RunDir

    cfg = as_config(HessianRunConfig, cfg, **overrides)
    validate(cfg)
    t0 = time.perf_counter()
    ds = load_dataset_rows(cfg.data, planned=True)  # rows mapped by plan_rows below
    check_columns(ds.column_names, cfg.data)
    if len(ds) == 0:
        raise BadInputError(f"dataset {cfg.data.dataset!r} (split {cfg.data.split!r}) is empty")
    rows_plan = plan_rows(cfg, ds)  # --chunk_length / --max_tokens: rows are not ds's rows
    n = len(ds) if rows_plan is None else len(rows_plan)
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
    pool = start_workers(cfg.ray, faults=faults)  # one worker in process, or a Ray pool
    rows = longest_first(ds, np.arange(n), cfg.data, rows_plan)  # similar lengths share a window
    windows = index_windows(rows, cfg.ray.window_size)
    groups = module_groups(cfg, list(modules))
    if len(groups) == 1:
        fits = [fit_modules(cfg, modules, owners, n, part, windows, rows_plan, faults, pool=pool)]
    else:  # --module_partitions: one pass per group into partition_<g>, then merged
        from ..hessians.partitions import merge_partitions, partition_dirs

        dirs = partition_dirs(part, len(groups))
        fits = []
        for g, group in enumerate(groups):
            log.info("hessian: module partition %d/%d (%d modules)", g + 1, len(groups), len(group))
            sub_cfg = dataclasses.replace(cfg, grad=dataclasses.replace(cfg.grad, modules=list(group)))
            sub = {m: modules[m] for m in group}
            sub_owners = plan_shards(sub_cfg, {m: costs[m] for m in group})
            fits.append(fit_modules(sub_cfg, sub, sub_owners, n, dirs[g], windows, rows_plan,
                                    faults, num_files=len(owners), pool=pool))
        merge_partitions(part, dirs)
    fit = fits[0]
    positions = fit.positions
    eig_seconds = {m: t for f in fits for m, t in f.eig_seconds.items()}
    memory = [m for f in fits for m in f.memory]
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
            "module_partitions": len(groups),
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
            "executor": "process" if pool.in_process else "ray",
            "method": cfg.hessian.method,
            "ev_correction": cfg.hessian.ev_correction,
            "documents": n,
            "positions": positions,
            "workers": fit.workers,
            "shards": len(owners),
            "module_partitions": len(groups),
            "shard_restarts": sum(f.shard_restarts for f in fits),
            "seconds": round(time.perf_counter() - t0, 3),
            **{k: round(sum(f.timings.get(k, 0.0) for f in fits), 3) for k in fit.timings},
            "eigendecomposition_module_s": {m: round(s, 4) for m, s in eig_seconds.items()},
            "shard_memory": memory,
            "worker_stats": fit.reported,
        }
    )
    return Path(run.commit())
