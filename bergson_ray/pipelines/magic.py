"""``bergson-ray magic``: exact metagradients through training (MAGIC) on Ray.

Plan on the driver, then one pool of ``MagicWorker`` actors (``actors/magic_worker.py``):

1. the first actor trains once, saving the ``--save_mode`` states (and the final one) to
   ``<run>/checkpoints`` (skipped on ``--resume`` when the final state is there);
2. every actor replays training backwards once per score column (one per query
   document with ``--aggregation none``, else one), writing ``per_query/q<j>.npy``
   atomically; ``--resume`` and a lost worker recompute only columns without a file;
3. the driver assembles ``<run>/scores`` (bergson's ``scores.bin`` + ``info.json``,
   loss-signed: score = +dL_query/dw, ``higher_is_better: false`` in its config.yaml),
   removes the checkpoints (``--cleanup_ckpts``), writes ``summary.json`` and renames
   ``<run>.part`` to ``<run>``;
4. with ``--skip_validation false``, ``validate`` runs on the new scores with the same
   model, data and training recipe, into ``<run>/validation``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..actors.magic_worker import MagicPool
from ..config.coerce import as_config
from ..config.magic import MagicRunConfig
from ..config.sections import RunConfig, require
from ..errors import BadInputError
from ..magic.engine import DataShape, MagicSpec, column_path, read_column
from ..store.run_dir import CONFIG_YAML, RunDir
from ..store.score_writer import ScoreWriter

log = logging.getLogger(__name__)

SCORES = "scores"
COLUMNS = "per_query"
CHECKPOINTS = "checkpoints"
SCORE_CFG = {"higher_is_better": False}
"""MAGIC scores are +dL_query/dw: lower (negative) = the document helps the query."""


def precheck(cfg: MagicRunConfig) -> None:
    """Bad input that needs no worker fails here, before ``<run>.part`` exists."""
    require(bool(cfg.run.run_path), "magic needs a run path")
    scores = Path(cfg.run.run_path) / SCORES
    if scores.exists() and not (cfg.run.overwrite or cfg.run.resume):
        raise BadInputError(
            f"scores already exist at {scores}; pass --overwrite to compute them again"
        )


def _spec(cfg: MagicRunConfig, run: RunDir, threads: int) -> MagicSpec:
    mc = cfg.magic
    return MagicSpec(
        cfg.model, cfg.data, cfg.query_data(), cfg.training,
        checkpoints=str(run.path / CHECKPOINTS), columns=str(run.path / COLUMNS),
        aggregation=mc.aggregation, attribute_tokens=mc.attribute_tokens,
        double_backward_batch_size=mc.double_backward_batch_size,
        backward_save_every=mc.backward_save_every,
        torch_threads=cfg.training.torch_threads or threads,
    )


def write_scores(path: Path, columns: list[np.ndarray], shape: DataShape, per_token: bool) -> Path:
    """The score store: one row per document, or per predicting token (``length - 1``
    rows per document, with ``offsets.npy`` and ``doc_ids.npy`` as bergson writes)."""
    q = len(columns)
    if not per_token:
        matrix = np.stack(columns, axis=1).astype(np.float32)
        with ScoreWriter(path, shape.num_train_docs, q) as w:
            w.write(np.arange(shape.num_train_docs), matrix)
    else:
        counts = np.maximum(np.asarray(shape.lengths, dtype=np.int64) - 1, 0)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        rows = np.concatenate(
            [np.stack([c[d, : counts[d]] for c in columns], axis=1) for d in range(len(counts))]
        ).astype(np.float32)
        with ScoreWriter(path, int(offsets[-1]), q, attribute_tokens=True, offsets=offsets) as w:
            w.write(np.arange(int(offsets[-1])), rows)
        width = max(shape.lengths)
        np.save(path / "doc_ids.npy", np.repeat(np.arange(len(counts))[:, None], width, axis=1))
    doc = {"steps": [{"magic": {"score_cfg": SCORE_CFG}}]}
    (path / CONFIG_YAML).write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def magic(cfg: MagicRunConfig | dict | None = None, *, faults: Any = None, **overrides: Any) -> Path:
    """Run ``magic`` and return the committed run directory (``faults``: tests only)."""
    from .workers import start_workers

    cfg = as_config(MagicRunConfig, cfg, **overrides)
    precheck(cfg)
    t0 = time.perf_counter()
    run = RunDir(cfg.run.run_path, overwrite=cfg.run.overwrite, resume=cfg.run.resume)
    run.write_config(
        {**dataclasses.asdict(cfg), "score_cfg": SCORE_CFG}, command="magic"
    )
    plan = start_workers(cfg.ray, faults=faults)  # one worker in process, or a Ray pool
    spec = _spec(cfg, run, plan.torch_threads)
    pool = MagicPool(spec, plan.size, num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
                     faults=faults, local=plan.in_process)  # fmt: skip
    try:
        shape: DataShape = pool.call("shape")
        jobs: list[int] = pool.call("jobs")
        trained = pool.call("train")
        if cfg.save_models or cfg.training.save_optimizer_state != "none":
            pool.call("save_outputs", str(run.path), cfg.save_models, cfg.training.save_optimizer_state)
        todo = [j for j in jobs if not column_path(spec.columns, j).is_file()]
        log.info("magic: %d score columns to compute, %d already written", len(todo), len(jobs) - len(todo))
        stats = pool.run(todo)
        rss = pool.peak_rss()
    finally:
        pool.shutdown()
    columns = [read_column(column_path(spec.columns, j)) for j in jobs]
    scores = run.path / SCORES
    if scores.exists():
        shutil.rmtree(scores)
    write_scores(scores, columns, shape, cfg.magic.attribute_tokens)
    if cfg.magic.cleanup_ckpts:
        shutil.rmtree(run.path / CHECKPOINTS, ignore_errors=True)
    run.write_summary({
        "documents": shape.num_train_docs, "query_documents": shape.num_query_docs,
        "aggregation": cfg.magic.aggregation, "attribute_tokens": cfg.magic.attribute_tokens,
        "columns": len(jobs), "columns_computed": stats.computed,
        "columns_reused": len(jobs) - len(todo), "columns_lost": stats.lost,
        "forward_ran": bool(trained), "workers": plan.size, "worker_peak_rss_mib": rss,
        "reverse_seconds": round(stats.seconds, 3), "seconds": round(time.perf_counter() - t0, 3),
    })
    path = run.commit()
    if not cfg.magic.skip_validation:
        run_validation(cfg, path)
    return path


def run_validation(cfg: MagicRunConfig, path: Path) -> Path:
    """``validate`` on the scores just written, with the same recipe (``<run>/validation``)."""
    from ..config.validation import ValidateConfig
    from .validate import validate

    vcfg = ValidateConfig(
        run=RunConfig(str(path / "validation"), overwrite=cfg.run.overwrite, resume=cfg.run.resume),
        scores=str(path / SCORES), higher_is_better=False, model=cfg.model, data=cfg.data,
        query=cfg.query, training=cfg.training, method=cfg.method, lds=cfg.lds,
        filter=cfg.filter, weight_step=cfg.weight_step, subset_weight=cfg.subset_weight,
        exclude_zero_scores=cfg.exclude_zero_scores, ray=cfg.ray,
    )
    return validate(vcfg)
