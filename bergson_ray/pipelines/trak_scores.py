"""TRAK's scores, on the driver: each member's training store against its preconditioned
query (weighted by ``(1 - p) / scale`` for a lone model), and an ensemble's combination
(bergson's rule, math in ``hessians/gram.py``), written a chunk of rows at a time as score
runs both tools read.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..config import BuildConfig
from ..config.trak import TrakRunConfig
from ..errors import BadInputError, StoreError
from .trak_members import CHUNK_ROWS, PROBS_NPY, SCALE_NPY, WEIGHTS_NPY, Member, Steps


def _query_matrix(
    cfg: TrakRunConfig, m: Member, qpath: Path, grad_sizes: dict[str, int]
) -> torch.Tensor:
    from ..gradients.scoring import prepare_query
    from ..hessians.preconditioner import load_preconditioner
    from ..store.config_yaml import load_step_config
    from ..store.gradient_store import GradientStore
    from ..store.processor import ProcessorConfig

    q = GradientStore.open(qpath)
    if q.num_grads == 0:
        raise BadInputError(f"query store {qpath} has no rows")
    mine, theirs = ProcessorConfig.from_gradient_config(m.grad), ProcessorConfig.load(qpath)
    if theirs is not None and theirs != mine:
        diffs = [
            f.name
            for f in dataclasses.fields(mine)
            if getattr(mine, f.name) != getattr(theirs, f.name)
        ]
        raise BadInputError(
            f"query store {qpath} was built with other projection settings ({', '.join(diffs)}) "
            "than this TRAK member; rebuild it with the same --projection_* flags"
        )
    try:
        done = load_step_config(qpath, BuildConfig).preprocess
    except (StoreError, ValueError, TypeError):
        done = None
    pre = dataclasses.replace(
        cfg.preprocess, hessian_path=str(m.path("train_hessian")), unit_normalize=False
    )
    precond = load_preconditioner(
        pre.hessian_path, inversion=pre.inversion, damping_factor=pre.damping_factor,
        modules=list(grad_sizes),
    )  # fmt: skip
    return prepare_query(
        q.rows(slice(None)), q.grad_sizes, grad_sizes, pre,
        done_at_build=done, mode=cfg.score.score, preconditioner=precond,
    )  # fmt: skip


def member_scores(
    cfg: TrakRunConfig, m: Member, steps: Steps, qpath: Path, weighted: bool
) -> None:
    """``scores/``: the training store against the query store ``qpath``, weighted by
    (1 - p)/scale for a lone model, unweighted (plus the weights and scale) for an
    ensemble member."""
    from ..gradients.scoring import num_score_columns, score_rows
    from ..hessians.gram import inverse_gram, inverse_scale, trak_weights, weight_scores
    from ..store.gradient_store import GradientStore
    from ..store.processor import load_hessians

    if steps.done("scores", after=("train", "train_probs", "train_hessian", "query")):
        return
    store = GradientStore.open(m.path("train"))
    query = _query_matrix(cfg, m, qpath, store.grad_sizes)
    (name,) = store.grad_sizes
    gram = load_hessians(m.path("train_hessian"))[name]
    scale = inverse_scale(
        inverse_gram(gram, cfg.preprocess.inversion, cfg.preprocess.damping_factor)
    )
    weights = trak_weights(torch.from_numpy(np.load(m.path("train_probs") / PROBS_NPY)))
    cols = num_score_columns(len(query), cfg.score.score)

    def chunks():
        for lo in range(0, store.num_grads, CHUNK_ROWS):
            hi = min(lo + CHUNK_ROWS, store.num_grads)
            s = score_rows(
                store.rows(slice(lo, hi)), query, cfg.score.score, cfg.score.query_batch_size
            )
            yield lo, (weight_scores(s, weights[lo:hi], scale) if weighted else s)

    extras = {WEIGHTS_NPY: weights.numpy(), SCALE_NPY: np.float64(scale)}
    write_score_store(
        cfg,
        m.path("scores"),
        m,
        store.num_grads,
        cols,
        chunks(),
        extras,
        summary={"queries": int(len(query)), "weighted": weighted, "scale": scale},
    )


def write_score_store(
    cfg: TrakRunConfig,
    final: Path,
    m: Member,
    n: int,
    cols: int,
    chunks,
    extras: dict,
    summary: dict,
) -> Path:
    """A score run dir in bergson's layout (``scores.bin``, ``info.json``, ``config.yaml``
    with ``score_cfg.higher_is_better``), plus ``data.hf`` of the training store."""
    from ..store.processor import ProcessorConfig, save_processor
    from ..store.run_dir import RunDir
    from ..store.score_writer import ScoreWriter
    from ..utils.dtypes import torch_dtype

    t0 = time.perf_counter()
    run = RunDir(final, overwrite=True)
    part = Path(run.part)
    dtype = torch_dtype(cfg.score.score_precision, "--score_precision")
    with ScoreWriter(part, n, cols, dtype) as writer:
        for lo, s in chunks:
            writer.write(np.arange(lo, lo + len(s)), s.float())
        if not writer.is_complete():
            raise RuntimeError(f"{len(writer.missing_rows())} rows of {final} were never scored")
    for fname, value in extras.items():
        np.save(part / fname, value)
    shutil.copytree(m.path("train") / "data.hf", part / "data.hf")
    save_processor(part, ProcessorConfig.from_gradient_config(m.grad))
    score_cfg = dataclasses.replace(cfg.score, higher_is_better=True)
    run.write_config({"score_cfg": score_cfg, "trak": cfg}, command="trak")
    if cfg.score.top_k > 0 or cfg.score.bottom_k > 0:
        _top_k(cfg, part)
    run.write_summary(
        {
            "command": "trak",
            "documents": n,
            "columns": cols,
            "seconds": round(time.perf_counter() - t0, 3),
            **summary,
        }
    )
    return Path(run.commit())


def _top_k(cfg: TrakRunConfig, part: Path) -> None:
    from ..data.loading import load_dataset_rows
    from ..store.score_store import ScoreStore
    from ..store.topk import TOPK_PARQUET, write_topk_parquet

    ds = load_dataset_rows(cfg.data)
    col = cfg.data.prompt_column
    texts = (lambda r: str(ds[int(r)][col])) if col in ds.column_names else None
    scores = ScoreStore.open(part).scores
    write_topk_parquet(part / TOPK_PARQUET, scores, cfg.score.top_k, cfg.score.bottom_k, texts)


def ensemble_scores(cfg: TrakRunConfig, members: list[Member], root: Path) -> Path:
    """``RUN_PATH/scores``: mean of the members' scaled scores times their mean weight."""
    from ..hessians.gram import combine_members
    from ..store.score_store import ScoreStore

    stores = [ScoreStore.open(m.path("scores")) for m in members]
    n, cols = stores[0].num_rows, stores[0].num_scores
    if any((s.num_rows, s.num_scores) != (n, cols) for s in stores):
        raise StoreError("the members' score stores differ in shape; rerun with --overwrite")
    weights = [torch.from_numpy(np.load(m.path("scores") / WEIGHTS_NPY)) for m in members]
    scales = [float(np.load(m.path("scores") / SCALE_NPY)) for m in members]

    def chunks():
        for lo in range(0, n, CHUNK_ROWS):
            hi = min(lo + CHUNK_ROWS, n)
            part = [torch.from_numpy(s.scores[lo:hi]) for s in stores]
            yield lo, combine_members(part, scales, [w[lo:hi] for w in weights])

    mean_w = torch.stack(weights).mean(0).numpy()
    extras = {WEIGHTS_NPY: mean_w, SCALE_NPY: np.asarray(scales, dtype=np.float64)}
    return write_score_store(
        cfg,
        root / "scores",
        members[0],
        n,
        cols,
        chunks(),
        extras,
        summary={"members": len(members), "scales": scales},
    )
