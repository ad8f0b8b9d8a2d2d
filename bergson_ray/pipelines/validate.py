"""``bergson-ray validate``: leave-k-out validation of attribution scores on Ray.

Plan on the driver (scores, subsets, banks: every bad input fails before a worker
starts), then one pool of retrain actors (``actors/retrain_worker.py``) runs every model
the method needs as a job: ``base`` (nothing removed) and ``subset_<i>`` for the LDS,
``filter_q<q>``/``control_<i>`` for ``filter``, ``lr_<i>`` for ``weight_step``, or
``bank<b>_<model>`` to evaluate saved banks. Each job's query losses land in
``losses/<key>.npy`` as soon as they arrive, so ``--resume`` (or a lost worker) redoes
only the jobs without a file; ``summary.json`` counts ``retrains_computed`` (this
invocation) and ``retrains_reused`` (found on disk). The run is written to
``<run>.part`` and renamed when the CSVs are complete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..actors.retrain_worker import Job, RetrainPool
from ..config.coerce import as_config
from ..config.sections import require
from ..config.validation import ValidateConfig
from ..errors import BadInputError
from ..store.run_dir import RunDir
from ..validation import bank as banks
from ..validation import csv_out
from ..validation.lds import compute_lds, weight_step_prediction
from ..validation.losses import LossBook, mean_loss
from ..validation.scores import LossSignedScores, check_scores, load_loss_signed
from ..validation.subsets import (
    SUBSETS_JSON,
    check_in_range,
    draw_subsets,
    fraction_size,
    load_subsets,
    pool_indices,
    random_removals,
    same_subsets,
    save_subsets,
    tail_removal,
)

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What every method needs once the pool is up."""

    cfg: ValidateConfig
    run: RunDir
    scores: LossSignedScores
    pool: RetrainPool
    book: LossBook
    query_tokens: np.ndarray
    reused: int = 0

    def losses(self, keys: list[str], make_job) -> dict[str, np.ndarray]:
        """Query losses of every key (``[Q]``: per query doc, or the mean for one column),
        running only the jobs without a finished file."""
        todo = self.book.missing(keys)
        self.reused += len(set(keys)) - len(set(todo))
        self.pool.run([make_job(k) for k in dict.fromkeys(todo)], self._store)
        return {k: self._reduce(self.book.read(k)) for k in keys}

    def _store(self, job: Job, losses: np.ndarray) -> None:
        self.book.write(job.key, losses)

    def _reduce(self, per_doc: np.ndarray) -> np.ndarray:
        if self.scores.multi_query:
            return per_doc
        return np.array([mean_loss(per_doc, self.query_tokens)])

    def retrain_job(self, key: str, removed: np.ndarray | None, save: bool = False) -> Job:
        save_to = str(banks.model_dir(self.run.path, key)) if save else None
        return Job(key, removed=removed, subset_weight=self.cfg.subset_weight, save_to=save_to)


def _lds_subsets(ctx: Context, pool_idx: np.ndarray) -> list[np.ndarray]:
    """Reuse ``subsets.json`` of a resumed run or ``--manifest``; else draw from the seed."""
    cfg, here = ctx.cfg, ctx.run.path / SUBSETS_JSON
    wanted = load_subsets(cfg.lds.manifest) if cfg.lds.manifest else None
    if here.is_file():
        subsets = load_subsets(here)
        if wanted is not None and not same_subsets(subsets, wanted):
            raise BadInputError(f"{here} (resumed run) disagrees with --manifest {cfg.lds.manifest}")
    else:
        subsets = wanted or draw_subsets(pool_idx, cfg.lds.count, cfg.lds.fraction, cfg.training.seed)
        save_subsets(here, subsets)
    check_in_range(subsets, ctx.scores.num_docs, "the subsets")
    return subsets


def _report_lds(ctx: Context, base, losses, subsets, ids: list[int], total: int) -> dict[str, Any]:
    res = compute_lds(base, losses, ctx.scores.matrix if ctx.scores.multi_query
                      else ctx.scores.matrix.sum(axis=1, keepdims=True), subsets, ids)
    start, stop = ids[0], ids[-1] + 1
    val_name, sum_name = csv_out.slice_names(start, stop, total)
    multi = ctx.scores.multi_query
    csv_out.write_validation(ctx.run.path / val_name, res, multi)
    csv_out.write_summary(ctx.run.path / (sum_name if multi else "summary.csv"), res, multi,
                          len(ids) if multi else total)
    for q, (sp, pe) in enumerate(zip(res.spearman, res.pearson)):
        log.info("query %d: Spearman %.4f (p=%.2e)  Pearson %.4f (p=%.2e)",
                 q, sp.statistic, sp.pvalue, pe.statistic, pe.pvalue)
    return {"mean_lds": res.mean_lds, "num_subsets": len(ids)}


def run_lds(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    if cfg.lds.subsets == "bank":
        return run_lds_bank(ctx)
    subsets = _lds_subsets(ctx, pool_indices(ctx.scores.matrix, cfg.exclude_zero_scores))
    stop = len(subsets) if cfg.lds.stop is None else min(cfg.lds.stop, len(subsets))
    require(cfg.lds.start < stop, f"--start {cfg.lds.start} is past the {len(subsets)} subsets")
    ids = list(range(cfg.lds.start, stop))
    keys = ["base", *(f"subset_{i}" for i in ids)]

    def job(key: str) -> Job:
        removed = None if key == "base" else subsets[int(key.split("_")[1])]
        return ctx.retrain_job(key, removed, save=cfg.save_models)

    out = ctx.losses(keys, job)
    losses = np.stack([out[f"subset_{i}"] for i in ids])
    return _report_lds(ctx, out["base"], losses, [subsets[i] for i in ids], ids, len(subsets))


def bank_losses(ctx: Context, paths: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Baseline ``[Q]`` and per-subset ``[n, Q]`` losses averaged over the banks; a bank
    without ``retrained/base`` contributes a zero baseline (correlations are unaffected)."""
    keys, jobs = [], {}
    for b, path in enumerate(paths):
        for name in ["base", *(f"subset_{i}" for i in range(n))]:
            if name == "base" and not banks.has_model(path, "base"):
                continue
            key = f"bank{b}_{name}"
            keys.append(key)
            jobs[key] = Job(key, model_dir=str(banks.model_dir(path, name)))
    out = ctx.losses(keys, jobs.__getitem__)
    q = len(next(iter(out.values())))
    base = np.mean([out.get(f"bank{b}_base", np.zeros(q)) for b in range(len(paths))], axis=0)
    per = np.stack([np.mean([out[f"bank{b}_subset_{i}"] for b in range(len(paths))], axis=0)
                    for i in range(n)])
    return base, per


def run_lds_bank(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    wanted = load_subsets(cfg.lds.manifest) if cfg.lds.manifest else None
    subsets = banks.read_banks(cfg.lds.paths, wanted)
    check_in_range(subsets, ctx.scores.num_docs, f"bank {cfg.lds.paths[0]}'s subsets.json")
    save_subsets(ctx.run.path / SUBSETS_JSON, subsets)
    base, per = bank_losses(ctx, cfg.lds.paths, len(subsets))
    ids = list(range(len(subsets)))
    return _report_lds(ctx, base, per, subsets, ids, len(subsets))


def run_filter(ctx: Context) -> dict[str, Any]:
    cfg, fc = ctx.cfg, ctx.cfg.filter
    matrix = ctx.scores.matrix
    pool_idx = pool_indices(matrix, cfg.exclude_zero_scores)
    k = fraction_size(fc.fraction, len(pool_idx))
    nq = matrix.shape[1]
    removed = {f"filter_q{q}": tail_removal(matrix[:, q], pool_idx, k, fc.direction) for q in range(nq)}
    controls: list[np.ndarray] = []
    if fc.controls.kind == "retrain":
        controls = random_removals(pool_idx, k, fc.controls.count or 0, cfg.training.seed)
    keys = ["base", *removed, *(f"control_{i}" for i in range(len(controls)))]
    everything = {**removed, **{f"control_{i}": c for i, c in enumerate(controls)}}
    out = ctx.losses(keys, lambda key: ctx.retrain_job(key, everything.get(key)))
    base = out["base"]
    changes = np.array([out[f"filter_q{q}"][q] - base[q] for q in range(nq)])
    rows = [[q, len(removed[f"filter_q{q}"]), base[q], out[f"filter_q{q}"][q], changes[q]]
            for q in range(nq)]
    csv_out.write_csv(ctx.run.path / f"{fc.name.replace('-', '_')}.csv", csv_out.FILTER_COLUMNS, rows)
    summary: dict[str, Any] = {"mean_loss_change": float(changes.mean()), "n_removed": k}
    if fc.controls.kind == "none":
        return summary
    if fc.controls.kind == "bank":
        controls = _control_bank(cfg, ctx.scores)
        rand_base, rand = bank_losses(ctx, fc.controls.paths, len(controls))
    else:
        rand_base, rand = base, np.stack([out[f"control_{i}"] for i in range(len(controls))])
    rchanges = rand - rand_base[None, :]
    csv_out.write_csv(ctx.run.path / "random_filter.csv", csv_out.RANDOM_COLUMNS, [
        [i, q, len(c), rand_base[q], rand[i, q], rchanges[i, q]]
        for i, c in enumerate(controls) for q in range(nq)])
    csv_out.write_csv(ctx.run.path / "filter_summary.csv", csv_out.FILTER_SUMMARY_COLUMNS,
                      csv_out.filter_summary_rows(changes, rchanges, k))
    summary["random_mean_loss_change"] = float(rchanges.mean())
    return summary


def _control_bank(cfg: ValidateConfig, scores: LossSignedScores) -> list[np.ndarray]:
    """The filter's random controls from banks, which must remove as many documents
    (within one: an LDS partition's parts differ by one) as the filter does."""
    fc = cfg.filter
    k = fraction_size(fc.fraction, len(pool_indices(scores.matrix, cfg.exclude_zero_scores)))
    controls = banks.read_banks(fc.controls.paths, None)
    if any(abs(len(c) - k) > 1 for c in controls):
        raise BadInputError(
            f"the control banks remove {sorted({len(c) for c in controls})} documents per "
            f"model but the filter removes {k}; retrain them with --fraction {fc.fraction}"
        )
    if fc.controls.count is not None and fc.controls.count > len(controls):
        raise BadInputError(
            f"--filter.controls.count {fc.controls.count} exceeds the {len(controls)} bank models"
        )
    return controls[: fc.controls.count] if fc.controls.count else controls


def run_weight_step(ctx: Context) -> dict[str, Any]:
    lrs = ctx.cfg.weight_step.lrs
    step, predicted = weight_step_prediction(ctx.scores.matrix)
    if not ctx.scores.multi_query:
        predicted = predicted.sum(keepdims=True)

    def job(key: str) -> Job:
        if key == "base":
            return Job(key)
        lr = lrs[int(key.split("_")[1])]
        return Job(key, weights=(1.0 - lr * step).astype(np.float32))

    out = ctx.losses(["base", *(f"lr_{i}" for i in range(len(lrs)))], job)
    multi, rows = ctx.scores.multi_query, []
    for i, lr in enumerate(lrs):
        diff = out["base"] - out[f"lr_{i}"]
        for q in range(len(diff)):
            pred = lr * predicted[q]
            rows.append([lr, q, diff[q], pred] if multi else [lr, diff[q], pred])
    cols = ["lr", "query", "diff", "predicted_diff"] if multi else ["lr", "diff", "predicted_diff"]
    csv_out.write_csv(ctx.run.path / "weight_step.csv", cols, rows)
    return {"lrs": list(lrs)}


METHODS = {"lds": run_lds, "filter": run_filter, "weight_step": run_weight_step}


def _default_spec(cfg: ValidateConfig):
    from ..validation.retrainer import RetrainSpec

    return RetrainSpec(cfg.model, cfg.data, cfg.query_data(), cfg.training)


def precheck(cfg: ValidateConfig, spec: Any) -> LossSignedScores:
    """Every check that needs no worker, so bad input fails before Ray starts and before
    ``<run>.part`` exists: scores against the data, subsets, manifests and banks."""
    require(bool(cfg.run.run_path), "validate needs a run path")
    require(bool(cfg.scores), "validate needs --scores SCORE_DIR")
    scores = load_loss_signed(cfg.scores, cfg.higher_is_better)
    n_train, n_query = spec.count_docs()
    check_scores(scores, n_train, n_query)
    if cfg.method == "filter" and cfg.filter.controls.kind == "bank":
        _control_bank(cfg, scores)
    if cfg.method != "lds":
        return scores
    wanted = load_subsets(cfg.lds.manifest) if cfg.lds.manifest else None
    if cfg.lds.subsets == "bank":
        subsets = banks.read_banks(cfg.lds.paths, wanted)
        check_in_range(subsets, n_train, f"bank {cfg.lds.paths[0]}'s subsets.json")
    elif wanted is not None:
        check_in_range(wanted, n_train, f"--manifest {cfg.lds.manifest}")
    else:
        pool_idx = pool_indices(scores.matrix, cfg.exclude_zero_scores)
        draw_subsets(pool_idx, cfg.lds.count, cfg.lds.fraction, cfg.training.seed)
    return scores


def validate(cfg: ValidateConfig | dict | None = None, *, retrainer: Any = None, faults: Any = None,
             **overrides: Any) -> Path:
    """Run ``validate`` and return the committed run directory.

    ``retrainer`` replaces the production engine (``validation/retrainer.py``) with any
    picklable object with ``count_docs()`` and a ``build()`` giving the same methods (tests
    use a stand-in); ``faults`` is a :class:`~bergson_ray.testing.faults.FaultPlan`.
    """
    import dataclasses

    from .workers import start_workers

    cfg = as_config(ValidateConfig, cfg, **overrides)
    spec = retrainer if retrainer is not None else _default_spec(cfg)
    scores = precheck(cfg, spec)
    run = RunDir(cfg.run.run_path, overwrite=cfg.run.overwrite, resume=cfg.run.resume)
    run.write_config(_bergson_view(cfg), command="validate")
    plan = start_workers(cfg.ray, faults=faults)  # one worker in process, or a Ray pool
    if retrainer is None:
        spec = dataclasses.replace(spec, torch_threads=cfg.training.torch_threads or plan.torch_threads)
    pool = RetrainPool(spec, plan.size, num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
                       faults=faults, local=plan.in_process)  # fmt: skip
    try:
        shape = pool.call("shape")
        check_scores(scores, shape.num_train_docs, shape.num_query_docs)
        ctx = Context(cfg, run, scores, pool, LossBook(run.path), np.asarray(shape.query_tokens))
        result = METHODS[cfg.method](ctx)
    finally:
        pool.shutdown()
    summary = {
        "method": cfg.method, **result, "multi_query": scores.multi_query,
        "scores_negated": scores.negated, "retrains_computed": pool.stats.computed,
        "retrains_reused": ctx.reused, "retrains_lost": pool.stats.lost,
        "workers": plan.size, "seconds": round(pool.stats.seconds, 3),
    }
    run.write_summary(summary)
    if "mean_lds" in result:
        log.info("mean LDS (Spearman) over queries: %.4f", result["mean_lds"])
    return run.commit()


def _bergson_view(cfg: ValidateConfig) -> dict[str, Any]:
    """Our nested config, plus the flat fields bergson compares when it reads our bank
    (``model`` as the resolved name bergson would be given; our model section is kept
    as ``model_cfg``)."""
    import dataclasses

    from ..defaults.tiny import resolve_model_path

    return {**dataclasses.asdict(cfg), "model": resolve_model_path(cfg.model.model),
            "subset_weight": cfg.subset_weight, "exclude_zero_scores": cfg.exclude_zero_scores,
            "model_cfg": dataclasses.asdict(cfg.model)}
