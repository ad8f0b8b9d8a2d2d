"""``reduce``: one mean (or sum) gradient of a dataset, aggregated by a reducer actor.

Same workers and data path as ``build``; instead of returning rows, each worker
sends a per-batch partial sum (fp64) to a single :class:`~bergson_ray.actors.reducer.Reducer`.
The result is a one-row fp32 store usable as ``score --query_path``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..config import BuildConfig, as_config
from ..data.length_order import longest_first
from ..errors import BadInputError
from ..testing.faults import FaultPlan
from .stages import (
    PROGRESS_DIR,
    Progress,
    open_dataset,
    plan_layout,
    plan_rows,
    runner_spec,
    validate_build,
)
from .storage import remote_output
from .workers import run_workers, start_workers, stream

log = logging.getLogger(__name__)


@remote_output(BuildConfig)  # s3:// / gs:// run paths: stage locally, upload when done
def reduce(
    cfg: BuildConfig | dict | None = None, *, faults: FaultPlan | None = None, **overrides
) -> Path:
    """Aggregate a dataset's (preprocessed) gradients into one row; returns the run dir."""
    import datasets

    from ..actors.batch_worker import PartialSums
    from ..actors.local_handles import LocalClass, get, kill
    from ..actors.reducer import RunningSum
    from ..gradients.preprocess import unit_normalize
    from ..store.gradient_writer import GradientStoreWriter
    from ..store.processor import ProcessorConfig, save_processor, write_total_processed
    from ..store.run_dir import RunDir
    from ..utils.metrics import StageMonitor
    from .placement import driver_node_strategy
    from .storage import cluster_probe

    cfg = as_config(BuildConfig, cfg, **overrides)
    if cfg.preprocess.aggregation == "none":
        cfg.preprocess = dataclasses.replace(cfg.preprocess, aggregation="mean")
    if cfg.grad.attribute_tokens:
        raise BadInputError("reduce aggregates documents; it cannot be combined with attribute_tokens")
    validate_build(cfg)
    if cfg.run.resume:
        log.warning("reduce keeps its running sum in memory: --resume recomputes from scratch")
    run = RunDir(cfg.run.run_path, overwrite=cfg.run.overwrite or cfg.run.resume)
    part = Path(run.part)
    t0 = time.perf_counter()
    ds, advantages = open_dataset(cfg)
    layout = plan_layout(cfg.model, cfg.grad)
    rows_plan = plan_rows(cfg, ds)  # --chunk_length / --max_tokens: rows are not ds's rows
    n = len(ds) if rows_plan is None else len(rows_plan)
    progress = Progress(part, n)

    monitor = StageMonitor("reduce", n, n, run=run.final.name)
    pool = start_workers(cfg.ray, monitor, faults)  # Ray only when the pool needs it
    probe = None if pool.in_process else cluster_probe(part, cfg.data, cfg.model, faults)
    if pool.in_process:
        reducer = LocalClass(RunningSum).remote(n, layout.dim)
    else:
        from ..actors.reducer import Reducer

        reducer = Reducer.options(scheduling_strategy=driver_node_strategy()).remote(n, layout.dim)
    spec = runner_spec(cfg, pool.device, advantages, rows_plan)
    sums = PartialSums(reducer)
    work = longest_first(ds, np.arange(n), cfg.data, rows_plan)  # similar lengths share a window
    out_ds = run_workers(work, spec, sums, cfg.ray, pool, probe=probe, faults=faults)
    for out in stream(out_ds, n, "reduce", monitor=monitor):
        progress.update(out)
    total, counted, dups = get(reducer.result.remote())
    kill(reducer)
    if counted != n:
        raise RuntimeError(f"reducer counted {counted} of {n} documents")
    if dups:
        log.info("reducer ignored %d re-sent batches (worker restarts)", dups)
    # bergson divides by len(dataset), counting documents too short to have a gradient
    row = total / n if cfg.preprocess.aggregation == "mean" else total
    row = row.astype(np.float32)[None, :]
    if cfg.preprocess.normalize_aggregated_grad:
        row = unit_normalize(torch.from_numpy(row)).numpy()

    writer = GradientStoreWriter(part, num_items=1, grad_sizes=layout.grad_sizes, dtype="float32")
    writer.write_rows([0], row)
    writer.close()
    datasets.Dataset.from_dict({"query_index": [0]}).save_to_disk(str(part / "data.hf"))
    from ..store.config_yaml import build_step_body  # ours + bergson's index_cfg/preprocess_cfg

    # a reduce store is a (one-row) build store; bergson's score reads its preprocess_cfg
    run.write_config(build_step_body(cfg), command="build")
    save_processor(part, ProcessorConfig.from_gradient_config(cfg.grad))
    lengths = np.asarray(progress.length)
    write_total_processed(part, int(np.maximum(lengths - 1, 0).sum()))
    run.write_summary(
        {
            "command": "reduce",
            "aggregation": cfg.preprocess.aggregation,
            "documents": n,
            "tokens": int(lengths.sum()),
            "seconds": round(time.perf_counter() - t0, 3),
            "mean_loss": float(np.asarray(progress.loss).mean()),
            **monitor.summary(),
        }
    )
    shutil.rmtree(part / PROGRESS_DIR, ignore_errors=True)
    return Path(run.commit())
