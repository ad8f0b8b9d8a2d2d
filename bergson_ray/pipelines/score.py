"""``score``: stream a dataset through gradient workers and score it against a query store.

The query store is read once by the driver, turned into the final query matrix
(module subset, preconditioning, normalization, aggregation) and put in the object
store; each worker fetches it once. Workers compute gradients and immediately
reduce them to scores, so gradients are never written and memory stays flat in
corpus size. Scores land in bergson's ``scores.bin`` layout at their row index with
``written`` flags, which is what ``--resume`` uses to skip finished rows.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..config import BuildConfig, PreprocessConfig, ScoreRunConfig, as_config
from ..data.length_order import longest_first
from ..errors import BadInputError, StoreError
from ..testing.faults import FaultPlan
from ..utils.dtypes import torch_dtype
from .stages import (
    PROGRESS_DIR,
    Progress,
    open_dataset,
    plan_layout,
    plan_rows,
    runner_spec,
    token_offsets,
    write_data_hf,
)
from .storage import localize_store, remote_output
from .workers import run_workers, start_workers, stream

log = logging.getLogger(__name__)


def check_query_compatible(query_path: Path, cfg: ScoreRunConfig) -> None:
    """Refuse a query store made with other projection settings (its numbers live elsewhere)."""
    from ..store.processor import ProcessorConfig

    qp = ProcessorConfig.load(query_path)
    if qp is None:
        return
    mine = ProcessorConfig.from_gradient_config(cfg.grad)
    diffs = [
        f"{f}: query {getattr(qp, f)!r} vs this run {getattr(mine, f)!r}"
        for f in ("projection_dim", "projection_type", "projection_target", "include_bias")
        if getattr(qp, f) != getattr(mine, f)
    ]
    if qp.projection_dim:  # without a projection these settings change nothing
        diffs += [
            f"{f}: query {getattr(qp, f)!r} vs this run {getattr(mine, f)!r}"
            for f in ("projection_scale", "projection_seed", "projection_version")
            if getattr(qp, f) != getattr(mine, f)
        ]
    if diffs:
        hint = ""
        if qp.projection_dim and qp.projection_version != mine.projection_version:
            hint = (
                f" (pass --projection_version {qp.projection_version} to score against it, "
                "or rebuild the query store)"
            )
        raise BadInputError(
            f"query store {query_path} was built with other gradient settings: "
            + "; ".join(diffs)
            + hint
        )


_CONFIG_NOISE = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype"}


def check_query_model(query_path: Path, cfg: ScoreRunConfig, store_modules: list[str],
                      target_modules: list[str]) -> None:
    """Refuse a query store from another architecture or module set; warn when it comes
    from the same architecture with other weights (bergson allows that; it mixes two
    models' gradients, so the user should know)."""
    from ..store.config_yaml import load_step_config
    from .stages import model_config

    missing = [m for m in target_modules if m not in store_modules]
    if missing:
        raise BadInputError(
            f"query store {query_path} has no rows for module(s) {', '.join(missing[:3])}"
            + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
            + ": it was built from another model or module set; rebuild it with this --model"
        )
    try:
        built = load_step_config(query_path, BuildConfig).model
    except (StoreError, ValueError, TypeError):
        return  # a store whose config we cannot read: the projection checks still ran
    if (built.model, built.revision) == (cfg.model.model, cfg.model.revision):
        return
    try:
        theirs, mine = model_config(built).to_dict(), model_config(cfg.model).to_dict()
    except BadInputError:
        log.warning("query store %s was built from %s; cannot compare it with %s",
                    query_path, built.model, cfg.model.model)
        return
    differ = sorted(k for k in set(theirs) | set(mine)
                    if k not in _CONFIG_NOISE and theirs.get(k) != mine.get(k))
    if differ:
        shown = ", ".join(f"{k}={theirs.get(k)!r} vs {mine.get(k)!r}" for k in differ[:3])
        raise BadInputError(
            f"query store {query_path} was built from {built.model!r}, another architecture "
            f"than --model {cfg.model.model!r} ({shown}); rebuild the query with this model"
        )
    log.warning(
        "query store %s was built from %s, this run scores with %s: same architecture, other "
        "weights, so the scores compare gradients of two different models",
        query_path, built.model, cfg.model.model,
    )


def query_preprocess_done(query_path: Path) -> PreprocessConfig | None:
    """What the query store's own build already applied (None for stores we can't read)."""
    from ..store.config_yaml import load_step_config

    try:
        return load_step_config(query_path, BuildConfig).preprocess
    except (StoreError, ValueError, TypeError):
        return None


def load_query_matrix(cfg: ScoreRunConfig, target_sizes: dict[str, int]) -> torch.Tensor:
    from ..gradients.scoring import prepare_query
    from ..store.gradient_store import GradientStore

    if not cfg.score.query_path:
        raise BadInputError("--query_path is required (a store written by build or reduce)")
    qpath = Path(localize_store(cfg.score.query_path))  # s3:// / gs:// stores: local copy
    if not qpath.exists():
        raise BadInputError(f"--query_path {qpath} does not exist")
    store = GradientStore.open(qpath)
    check_query_compatible(qpath, cfg)
    check_query_model(qpath, cfg, list(store.grad_sizes), list(target_sizes))
    if store.num_grads == 0:
        raise BadInputError(f"query store {qpath} has no rows")
    rows = store.rows(np.arange(store.num_grads))
    pre = cfg.preprocess
    preconditioner = None
    if pre.hessian_path:
        from ..hessians.preconditioner import load_preconditioner

        preconditioner = load_preconditioner(
            pre.hessian_path,
            inversion=pre.inversion,
            damping_factor=pre.damping_factor,
            ev_correction=pre.ev_correction,
            modules=list(target_sizes),
        )
    return prepare_query(
        rows,
        store.grad_sizes,
        target_sizes,
        pre,
        done_at_build=query_preprocess_done(qpath),
        mode=cfg.score.score,
        preconditioner=preconditioner,
    )


def index_side_preprocess(pre: PreprocessConfig) -> PreprocessConfig:
    """Training rows: cosine -> ``H^{-1/2}`` and unit norm; inner product -> untouched."""
    return dataclasses.replace(
        pre,
        hessian_path=pre.hessian_path if pre.unit_normalize else None,
        aggregation="none",
        normalize_aggregated_grad=False,
    )


@remote_output(ScoreRunConfig)  # s3:// / gs:// run paths: stage locally, upload when done
def score(
    cfg: ScoreRunConfig | dict | None = None, *, faults: FaultPlan | None = None, **overrides
) -> Path:
    """Score a dataset against ``query_path``; returns the finished run directory."""
    from ..actors.batch_worker import Scores
    from ..store.processor import ProcessorConfig, save_processor, write_total_processed
    from ..store.run_dir import RunDir
    from ..store.score_writer import ScoreWriter
    from ..store.topk import TOPK_PARQUET, write_topk_parquet
    from ..utils.metrics import StageMonitor, dir_bytes
    from .storage import cluster_probe

    cfg = as_config(ScoreRunConfig, cfg, **overrides)
    if cfg.score.score not in ("individual", "nearest", "mean", "max"):
        raise BadInputError(f"unknown --score mode {cfg.score.score!r}")
    if not cfg.run.run_path:
        raise BadInputError("run_path is required")
    layout = plan_layout(cfg.model, cfg.grad)
    query = load_query_matrix(cfg, layout.grad_sizes)  # fail on a bad query before any work
    run = RunDir(cfg.run.run_path, overwrite=cfg.run.overwrite, resume=cfg.run.resume)
    part = Path(run.part)
    t0 = time.perf_counter()
    ds, advantages = open_dataset(cfg)
    rows_plan = plan_rows(cfg, ds)  # --chunk_length / --max_tokens: rows are not ds's rows
    n = len(ds) if rows_plan is None else len(rows_plan)
    cand = run_candidates(cfg, run, n)  # --scores: only an earlier run's best rows
    n_rows, n = n, n if cand is None else len(cand)
    cols = 1 if cfg.score.score in ("nearest", "max", "mean") else len(query)
    per_token = cfg.grad.attribute_tokens
    if (part / "scores.bin").exists():
        from ..store.config_yaml import check_resume_settings

        check_resume_settings(part, "score", cfg)
        writer = ScoreWriter.reopen(part)
        if writer.num_scores != cols or writer.num_items != n:
            raise BadInputError(f"--resume: {part} was started with other settings")
    else:
        offsets = token_offsets(cfg, ds, rows_plan) if per_token else None
        writer = ScoreWriter(
            part, offsets[-1] if per_token else n, cols,
            torch_dtype(cfg.score.score_precision, "--score_precision"),
            attribute_tokens=per_token, offsets=offsets,
        )
        body = dataclasses.asdict(cfg)
        body["score_cfg"] = dataclasses.asdict(cfg.score)  # where bergson looks for it
        body["score_cfg"]["candidates"] = dataclasses.asdict(cfg.candidates)
        body["score_cfg"]["token_influence"] = cfg.token_influence
        run.write_config(body, command="score")
    todo = pending_items(writer, n, per_token)
    progress = Progress(part, n)
    log.info("score: %d documents (%d to do) against %d queries -> %d columns", n, len(todo), len(query), cols)

    monitor = StageMonitor("score", len(todo), n_rows, run=run.final.name)  # sees dataset rows
    if len(todo):
        pool = start_workers(cfg.ray, monitor, faults)  # Ray only when the pool needs it
        probe = None if pool.in_process else cluster_probe(part, cfg.data, cfg.model, faults)
        index_cfg = dataclasses.replace(cfg, preprocess=index_side_preprocess(cfg.preprocess))
        spec = runner_spec(index_cfg, pool.device, advantages, rows_plan)
        spec.token_influence = cfg.token_influence
        bank = query.numpy()
        if not pool.in_process:
            import ray

            bank = ray.put(bank)  # fetched once per worker
        scores = Scores(bank, cfg.score.score, cfg.score.query_batch_size)
        work = todo if cand is None else cand[todo]  # workers see dataset (planned) rows
        work = longest_first(ds, work, cfg.data, rows_plan)  # similar lengths share a window
        out_ds = run_workers(work, spec, scores, cfg.ray, pool, probe=probe, faults=faults)
        for k, out in enumerate(stream(out_ds, len(todo), "score", monitor=monitor)):
            if cand is not None:  # dataset row -> its row in the compact store
                out = {**out, "idx": np.searchsorted(cand, out["idx"])}
            progress.update(out)  # first: a row marked written must have its loss/length
            if per_token:
                parts = [np.asarray(x, np.float32).reshape(-1, cols) for x in out["scores"]]
                writer.write_items(out["idx"], np.concatenate(parts) if parts else np.zeros((0, cols)))
            else:
                writer.write(out["idx"], out["scores"])
            if k % 32 == 31:
                writer.flush()
                progress.flush()
    writer.flush()
    progress.flush()
    left = pending_items(writer, n, per_token)
    if len(left):
        raise RuntimeError(f"{len(left)} documents were never scored (e.g. {left[:5]})")

    write_scored_data_hf(part, ds, progress, cfg.drop_columns, rows_plan, cand)
    save_processor(part, ProcessorConfig.from_gradient_config(cfg.grad))
    lengths = np.asarray(progress.length)
    write_total_processed(part, int(np.maximum(lengths - 1, 0).sum()))
    if cfg.score.top_k > 0 or cfg.score.bottom_k > 0:
        col = cfg.data.prompt_column
        src = ds if rows_plan is None else rows_plan.view(ds)  # chunks: no text per row
        ids = np.arange(n) if cand is None else cand  # store row -> dataset (planned) row
        texts = (
            (lambda r: str(src[int(ids[r])][col]))
            if src is not None and col in src.column_names and not per_token
            else None
        )
        write_topk_parquet(
            part / TOPK_PARQUET, ScoreColumns(writer), cfg.score.top_k, cfg.score.bottom_k, texts,
            row_ids=cand,
        )
    seconds = time.perf_counter() - t0
    run.write_summary(
        {
            "command": "score",
            "documents": n,
            "computed_documents": int(len(todo)),
            **({} if cand is None else {"candidates": int(len(cand)), "dataset_rows": n_rows}),
            "queries": int(len(query)),
            "columns": cols,
            "tokens": int(lengths.sum()),
            "seconds": round(seconds, 3),
            "documents_per_second": round(n / max(seconds, 1e-9), 2),
            "bytes_written": dir_bytes(part),
            **monitor.summary(),
        }
    )
    writer.close()
    shutil.rmtree(part / PROGRESS_DIR, ignore_errors=True)  # now in data.hf
    return Path(run.commit())


def run_candidates(cfg: ScoreRunConfig, run, num_rows: int) -> np.ndarray | None:
    """``--scores``: the dataset rows this run scores (None: all of them).

    A new run selects them from the earlier run and saves ``candidates.npy`` before the
    score file exists, so a resumed run finds them; a resumed run reads them back. Bad
    input removes the fresh ``.part`` so the user can simply rerun.
    """
    from ..store.candidates import load_candidates, save_candidates, select_candidates

    part = Path(run.part)
    if (part / "scores.bin").exists():  # --resume: the rows chosen when the run started
        saved = load_candidates(part, num_rows)
        if (saved is None) == cfg.candidates.active:
            raise BadInputError(f"--resume: {part} was started with other --scores settings")
        return saved
    if not cfg.candidates.active:
        return None
    try:
        cand = select_candidates(cfg.candidates, num_rows)
    except BadInputError:
        if not run.resumed:
            shutil.rmtree(part, ignore_errors=True)
        raise
    log.info("score: rescoring %d of %d rows chosen from %s", len(cand), num_rows, cfg.candidates.scores)
    save_candidates(part, cand)
    return cand


def write_scored_data_hf(part: Path, ds, progress, drop_columns: bool, rows_plan, cand) -> None:
    """``data.hf`` of the scored rows: every row, or only the candidates (as bergson's
    ``ds.select(candidates)``), chunked stores with bergson's chunk columns."""
    if cand is None:
        return write_data_hf(part, ds, progress, drop_columns, rows_plan)
    from ..data.row_plan import RowPlan, chunk_table

    if rows_plan is None or rows_plan.chunks is None:
        source = cand if rows_plan is None else rows_plan.source[cand]
        return write_data_hf(part, ds, progress, drop_columns, RowPlan(source=source))
    length = np.zeros(len(rows_plan), np.int64)
    loss = np.zeros(len(rows_plan), np.float32)
    length[cand], loss[cand] = progress.length[:], progress.loss[:]
    table = chunk_table(rows_plan.chunks, length, loss).select(cand)
    table.save_to_disk(str(part / "data.hf"))


class ScoreColumns:
    """Row slices of a score file as ``[rows, cols]`` float32 (so top-k can stream it)."""

    def __init__(self, writer):
        self.mm, self.cols = writer.mm, writer.num_scores
        self.shape = (len(self.mm), self.cols)

    def __getitem__(self, sl: slice) -> np.ndarray:
        block = self.mm[sl]
        return np.stack([np.asarray(block[f"score_{q}"], np.float32) for q in range(self.cols)], 1)


def pending_items(writer, n: int, per_token: bool) -> np.ndarray:
    """Documents with at least one unwritten score row."""
    missing = writer.missing_rows()
    if not per_token:
        return missing
    items = np.searchsorted(writer.offsets, missing, side="right") - 1
    return np.unique(items).astype(np.int64)
