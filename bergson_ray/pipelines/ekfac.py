"""``ekfac``: EK-FAC influence of training data on a query set, end to end (bergson §4.3).

Steps, each a run directory under ``RUN_PATH`` (a finished one is reused unless
``--overwrite``)::

    query/            full query gradients (projection 0), aggregated per --query_aggregation
    hessian/<method>/ factors of the training data (+ EK-FAC corrections)
    <method>_query/   H⁻¹ q for each query row; compressed with the index's Kronecker
                      projection L (H⁻¹Q) Rᵀ when --projection_dim > 0
    scores/           training data scored against it (inner product)

The preconditioned query is a plain gradient store whose ``config.yaml`` records
the Hessian, so ``score`` does not apply it a second time.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..config import (
    BuildConfig,
    EkfacRunConfig,
    HessianRunConfig,
    PreprocessConfig,
    RunConfig,
    ScoreConfig,
    as_config,
)
from ..errors import BadInputError
from .stages import with_default_query
from .steps import score_step

log = logging.getLogger(__name__)


def _step(root: Path, name: str, overwrite: bool) -> tuple[Path, bool]:
    """``(path, done)``: a finished step is reused unless overwriting."""
    path = root / name
    done = path.exists() and not overwrite
    if done:
        log.info("ekfac: reusing finished step %s", path)
    return path, done


def _query_store(cfg: EkfacRunConfig, path: Path) -> Path:
    from .build import build
    from .reduce import reduce

    full = dataclasses.replace(cfg.grad, projection_dim=0)
    bcfg = BuildConfig(
        run=RunConfig(run_path=str(path), overwrite=cfg.run.overwrite),
        model=cfg.model,
        data=cfg.query,
        grad=full,
        batch=cfg.batch,
        preprocess=PreprocessConfig(aggregation=cfg.query_aggregation),
        ray=cfg.ray,
        skip_short_docs=cfg.skip_short_docs,
    )
    return reduce(bcfg) if cfg.query_aggregation != "none" else build(bcfg)


def _hessian(cfg: EkfacRunConfig, path: Path) -> Path:
    from .hessian import hessian

    return hessian(
        HessianRunConfig(
            run=RunConfig(run_path=str(path), overwrite=cfg.run.overwrite),
            model=cfg.model,
            data=cfg.data,
            grad=dataclasses.replace(cfg.grad, projection_dim=0),
            batch=cfg.batch,
            hessian=cfg.hessian,
            ray=cfg.ray,
            skip_short_docs=cfg.skip_short_docs,
        )
    )


def precondition_query(
    cfg: EkfacRunConfig, query_path: Path, hessian_path: Path, out: Path
) -> Path:
    """``H⁻¹ q`` per query row (then the index's projection, if any) as a gradient store."""
    from ..gradients.projection import ProjectionCache
    from ..hessians.factored_io import read_factored
    from ..hessians.preconditioner import FactoredPreconditioner
    from ..store.gradient_store import GradientStore
    from ..store.gradient_writer import GradientStoreWriter
    from ..store.processor import ProcessorConfig, save_processor
    from ..store.run_dir import RunDir
    from .stages import plan_layout

    store = GradientStore.open(query_path)
    factors = read_factored(hessian_path)
    pre = FactoredPreconditioner(
        factors,
        inversion=cfg.inversion,
        damping_factor=cfg.damping_factor,
        ev_correction=cfg.hessian.ev_correction,
    )
    target = plan_layout(cfg.model, cfg.grad).grad_sizes
    missing = [m for m in target if m not in factors]
    if missing:
        raise BadInputError(
            f"the Hessian has no factors for {missing[:3]}; fit it on the same modules"
        )
    p = cfg.grad.projection_dim
    proj = None
    if p:
        proj = ProjectionCache(
            cfg.grad.projection_type,
            cfg.grad.projection_scale,
            version=cfg.grad.projection_version,
            seed=cfg.grad.projection_seed,
        )
    run = RunDir(out, overwrite=cfg.run.overwrite)
    writer = GradientStoreWriter(
        run.part, num_items=store.num_grads, grad_sizes=target, dtype="float32"
    )
    columns = store.column_offsets
    for name in target:
        o, i = factors[name].shape
        if store.grad_sizes.get(name) != o * i:
            raise BadInputError(
                f"query store {query_path} has no full {o}x{i} gradient for {name}; "
                "it must be built with --projection_dim 0 and the same --include_bias"
            )
    for lo in range(0, store.num_grads, cfg.apply_batch_size):
        rows = store.rows(np.arange(lo, min(lo + cfg.apply_batch_size, store.num_grads))).float()
        blocks = []
        for name in target:
            a, b = columns[name]
            g = pre.apply_module(name, rows[:, a:b], -1.0)
            if proj is not None:
                o, i = factors[name].shape
                left = proj.get(name, "left", p, o, torch.float32, "cpu")
                right = proj.get(name, "right", p, i, torch.float32, "cpu")
                g = (left @ g.reshape(-1, o, i) @ right.T).reshape(len(g), -1)
            blocks.append(g)
        writer.write_rows(np.arange(lo, lo + len(rows)), torch.cat(blocks, dim=1).numpy())
    writer.close()
    record = BuildConfig(
        model=cfg.model,
        data=cfg.query,
        grad=cfg.grad,
        batch=cfg.batch,
        preprocess=PreprocessConfig(
            hessian_path=str(hessian_path),
            ev_correction=cfg.hessian.ev_correction,
            inversion=cfg.inversion,
            damping_factor=cfg.damping_factor,
            aggregation=cfg.query_aggregation,
        ),
        ray=cfg.ray,
    )
    run.write_config(record, command="build")
    save_processor(run.part, ProcessorConfig.from_gradient_config(cfg.grad))
    return Path(run.commit())


def ekfac(cfg: EkfacRunConfig | dict | None = None, **overrides) -> Path:
    """Run the four steps; returns the ``scores/`` run directory."""
    cfg = as_config(EkfacRunConfig, cfg, **overrides)
    if not cfg.run.run_path:
        raise BadInputError("run_path is required")
    cfg = with_default_query(cfg, None)  # ekfac builds its own query store
    root = Path(cfg.run.run_path)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    qpath, done = _step(root, "query", cfg.run.overwrite)
    if not done:
        qpath = _query_store(cfg, qpath)
    hpath, done = _step(root, f"hessian/{cfg.hessian.method}", cfg.run.overwrite)
    if not done:
        hpath.parent.mkdir(parents=True, exist_ok=True)
        hpath = _hessian(cfg, hpath)
    tpath, done = _step(root, f"{cfg.hessian.method}_query", cfg.run.overwrite)
    if not done:
        tpath = precondition_query(cfg, qpath, hpath, tpath)
    spath = score_step(
        cfg,
        RunConfig(run_path=str(root / "scores"), overwrite=cfg.run.overwrite),
        ScoreConfig(
            query_path=str(tpath),
            score="individual",
            higher_is_better=True,
            query_batch_size=cfg.query_batch_size,
        ),
    )
    log.info("ekfac: done in %.1fs -> %s", time.perf_counter() - t0, spath)
    return spath
