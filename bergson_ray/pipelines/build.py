"""``build``: a per-example gradient store of a dataset, computed on a Ray actor pool.

Data path::

    row indices (Ray Data) ──► BatchWorker pool (reads rows, tokenizes, packs by
    token budget, per-example gradients, writes each row at its own index into the
    store on the shared run path) ──► driver: index, loss, length only; flags rows written

Rows land at their dataset index, so the store never depends on scheduling order, and
gradient bytes never pass through the driver (``driver_bytes_per_row`` in the summary:
a few tens of bytes, whatever the row width). Ray Data re-runs the batches of a crashed
worker; the rerun writes the same bytes, and a row is flagged written only once its
batch has returned, after its bytes were synced.
Everything goes to ``<run>.part`` and is renamed only when complete; ``--resume``
reopens the ``.part`` and computes only the rows its ``written`` bitmap lacks.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from ..config import BuildConfig, as_config
from ..data.length_order import longest_first
from ..errors import BadInputError
from ..testing.faults import FaultPlan
from .stages import (
    PROGRESS_DIR,
    Layout,
    Progress,
    open_dataset,
    plan_layout,
    plan_rows,
    runner_spec,
    token_offsets,
    validate_build,
    write_data_hf,
)
from .storage import remote_output
from .workers import run_workers, start_workers, stream

log = logging.getLogger(__name__)


@remote_output(BuildConfig)  # s3:// / gs:// run paths: stage locally, upload when done
def build(
    cfg: BuildConfig | dict | None = None, *, faults: FaultPlan | None = None, **overrides
) -> Path:
    """Build a per-example gradient store; returns the finished run directory.

    ``bergson_ray.build(run_path="runs/idx", projection_dim=16, dataset="tiny")``
    """

    from ..actors.batch_worker import StoredRows
    from ..store.config_yaml import check_resume_settings
    from ..store.files import check_room
    from ..store.gradient_writer import GradientStoreWriter
    from ..store.processor import ProcessorConfig, save_processor, write_total_processed
    from ..store.run_dir import RunDir
    from ..utils.metrics import StageMonitor, dir_bytes
    from .storage import cluster_probe

    cfg = as_config(BuildConfig, cfg, **overrides)
    validate_build(cfg)
    t0 = time.perf_counter()
    ds, advantages = open_dataset(cfg)
    layout: Layout = plan_layout(cfg.model, cfg.grad)
    rows_plan = plan_rows(cfg, ds)  # --chunk_length / --max_tokens: rows are not ds's rows
    n = len(ds) if rows_plan is None else len(rows_plan)
    if not (cfg.grad.attribute_tokens or cfg.run.resume):  # per-token counts come later
        check_room(Path(cfg.run.run_path).parent, n * layout.dim * layout.dtype.itemsize,
                   f"the store ({n} rows x {layout.dim} columns)")
    run = RunDir(cfg.run.run_path, overwrite=cfg.run.overwrite, resume=cfg.run.resume)
    part = Path(run.part)
    resuming = (part / "info.json").exists()
    if resuming:
        check_resume_settings(part, "build", cfg)
        writer = GradientStoreWriter.reopen(part)
        if writer.grad_sizes != layout.grad_sizes or writer.num_items != n:
            raise BadInputError(
                f"--resume: {part} was started with other settings (modules or row count differ)"
            )
    else:
        offsets = token_offsets(cfg, ds, rows_plan) if cfg.grad.attribute_tokens else None
        if offsets is not None:
            rows = int(offsets[-1])
            check_room(part, rows * layout.dim * layout.dtype.itemsize,
                       f"the store ({rows} token rows x {layout.dim} columns)")
        writer = GradientStoreWriter(
            part,
            num_items=n,
            grad_sizes=layout.grad_sizes,
            dtype=layout.dtype,
            attribute_tokens=cfg.grad.attribute_tokens,
            offsets=offsets,
        )
        from ..store.config_yaml import build_step_body  # ours + bergson's index_cfg/preprocess_cfg

        run.write_config(build_step_body(cfg), command="build")
    todo = writer.missing_items()
    progress = Progress(part, n)
    log.info("build: %d documents (%d to do), %d columns per row", n, len(todo), layout.dim)

    monitor = StageMonitor("build", len(todo), n, run=run.final.name)
    if len(todo):
        pool = start_workers(cfg.ray, monitor, faults)  # Ray only when the pool needs it
        probe = None if pool.in_process else cluster_probe(part, cfg.data, cfg.model, faults)
        spec = runner_spec(cfg, pool.device, advantages, rows_plan)
        rows = StoredRows(str(part))  # the workers write the rows; the driver flags them
        work = longest_first(ds, todo, cfg.data, rows_plan)  # similar lengths share a window
        out_ds = run_workers(work, spec, rows, cfg.ray, pool, probe=probe, faults=faults)
        for k, out in enumerate(stream(out_ds, len(todo), "build", monitor=monitor)):
            progress.update(out)  # first: a row marked written must have its loss/length
            writer.mark_written(out["idx"])  # its bytes were synced before the batch returned
            if k % 32 == 31:
                writer.flush()
                progress.flush()
    writer.flush()
    progress.flush()
    missing = writer.missing_items()
    if len(missing):
        raise RuntimeError(f"{len(missing)} rows were never written (e.g. {missing[:5]})")

    write_data_hf(part, ds, progress, cfg.drop_columns, rows_plan)
    save_processor(part, ProcessorConfig.from_gradient_config(cfg.grad))
    tokens = int(np.asarray(progress.length).sum())
    positions = int(np.maximum(np.asarray(progress.length) - 1, 0).sum())
    write_total_processed(part, positions)
    seconds = time.perf_counter() - t0
    run.write_summary(
        {
            "command": "build",
            "rows": int(writer.info.num_grads),
            "documents": n,
            "computed_documents": int(len(todo)),
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
            "bytes_written": int((part / "gradients.bin").stat().st_size),
            "run_bytes": dir_bytes(part),
            **monitor.summary(),
        }
    )
    writer.close()
    shutil.rmtree(part / PROGRESS_DIR, ignore_errors=True)  # now in data.hf
    return Path(run.commit())
