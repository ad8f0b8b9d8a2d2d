"""``lissa``: LiSSA influence with the damped Gauss-Newton Hessian, as bergson 2.5.1 runs it.

Steps, each a run directory under ``RUN_PATH``::

    query/         full query gradients (--projection_dim 0), aggregated per
                   --query_aggregation (skipped with --query_path, an existing store)
    lissa_query/   (G + damping I)^-1 q per query row, estimated by LiSSA: a gradient
                   store in query/'s layout
    scores/        every training row scored against lissa_query/ (inner product)

The LiSSA step is a pool of Ray actors (``actors/lissa_worker.py``); one job is one
repeat of one query, so both the queries and their repeats spread over the workers. Each
finished repeat is written atomically to ``lissa_query.part/repeats/``; the driver
combines a query's repeats in repeat order once all exist, so 1 or N workers give the
same store, and ``--resume`` recomputes only repeats without a file. A scale check on
one batch (power iteration) runs before the first repeat and fails with one sentence
when ``--scale`` is too small for the series to converge.

``--resume`` reuses finished steps (a step whose input was recomputed is recomputed
too) and continues an unfinished one; without it (or ``--overwrite``) an existing run
is refused. ``lissa.json`` at the top records what the last invocation did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import BuildConfig, PreprocessConfig, RunConfig, as_config
from ..config.lissa import LissaRunConfig
from ..errors import BadInputError
from .stages import with_default_query
from .steps import StepRecord, score_step

log = logging.getLogger(__name__)

STEPS = ("query", "lissa_query", "scores")
REPEATS = "repeats"
SETTINGS = "lissa_settings.json"
SUMMARY = "lissa.json"


def precheck(cfg: LissaRunConfig) -> int:
    """Bad input that needs no worker fails here, before any step runs; returns the
    number of training documents."""
    from ..data.loading import check_columns, load_dataset_rows
    from ..store.gradient_store import GradientStore

    if not cfg.run.run_path:
        raise BadInputError("lissa needs a run path")
    train = load_dataset_rows(cfg.data)
    check_columns(train.column_names, cfg.data)
    if len(train) == 0:
        raise BadInputError(
            f"the training set {cfg.data.dataset!r} (split {cfg.data.split!r}) is empty: "
            "LiSSA needs training documents for its Hessian-vector products"
        )
    if cfg.score.query_path:
        from .stages import plan_layout

        store = GradientStore.open(cfg.score.query_path)
        if store.num_grads == 0:
            raise BadInputError(f"query store {cfg.score.query_path} has no rows: nothing to attribute")
        want = plan_layout(cfg.model, cfg.grad).grad_sizes  # from the model config alone
        if store.grad_sizes != want:
            raise BadInputError(
                f"query store {cfg.score.query_path} does not hold full gradients of this "
                "model's modules: build it with --projection_dim 0 and the same --model, module "
                "filters and --include_bias"
            )
        return len(train)
    query = load_dataset_rows(cfg.query)
    check_columns(query.column_names, cfg.query)
    if len(query) == 0:
        raise BadInputError(
            f"the query set {cfg.query.dataset!r} (split {cfg.query.split!r}) is empty: "
            "LiSSA needs at least one query document"
        )
    return len(train)


def _query_store(cfg: LissaRunConfig, steps: StepRecord) -> Path:
    """Full per-example query gradients (aggregated if asked); the training side's
    ``--attribute_tokens`` does not apply to the query (as bergson does when aggregating)."""
    from .build import build
    from .reduce import reduce

    bcfg = BuildConfig(
        run=steps.run_config("query"),
        model=cfg.model,
        data=cfg.query,
        grad=dataclasses.replace(cfg.grad, attribute_tokens=False),
        batch=cfg.batch,
        preprocess=PreprocessConfig(aggregation=cfg.query_aggregation),
        ray=cfg.ray,
        skip_short_docs=cfg.skip_short_docs,
    )
    return reduce(bcfg) if cfg.query_aggregation != "none" else build(bcfg)


def _settings_record(cfg: LissaRunConfig, query_path: Path) -> dict[str, Any]:
    return {**dataclasses.asdict(cfg.lissa), "query_path": str(query_path),
            "model": cfg.model.model, "data": dataclasses.asdict(cfg.data)}


def _check_resumed_settings(part: Path, record: dict[str, Any]) -> None:
    """Repeats of a resumed run must come from the same series (else they'd be mixed)."""
    path = part / SETTINGS
    if not path.is_file():
        path.write_text(json.dumps(record, indent=2) + "\n")
        return
    old = json.loads(path.read_text())
    differ = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
    if differ:
        raise BadInputError(
            f"--resume: {part} was started with other LiSSA settings ({', '.join(differ)}); "
            "pass --overwrite to start it again"
        )


def solve_queries(
    cfg: LissaRunConfig, query_path: Path, run_cfg: RunConfig, *, faults: Any = None
) -> tuple[Path, dict[str, Any]]:
    """The LiSSA step: ``(G + damping I)^-1 q`` for every query row, as a gradient store."""
    from ..actors.lissa_runner import LissaSpec, read_repeat, repeat_path
    from ..actors.lissa_worker import LissaPool
    from ..hessians.lissa import LissaSettings, combine_repeats
    from ..store.gradient_store import GradientStore
    from ..store.gradient_writer import GradientStoreWriter
    from ..store.processor import ProcessorConfig, save_processor
    from ..store.run_dir import RunDir
    from .workers import start_workers

    t0 = time.perf_counter()
    store = GradientStore.open(query_path)
    n_q = store.num_grads
    if n_q == 0:
        raise BadInputError(f"query store {query_path} has no rows: nothing to attribute")
    lc = cfg.lissa
    settings = LissaSettings(lc.damping, lc.scale, lc.depth, lc.batch_size)
    run = RunDir(run_cfg.run_path, overwrite=run_cfg.overwrite, resume=run_cfg.resume)
    _check_resumed_settings(run.part, _settings_record(cfg, query_path))
    repeats_dir = run.part / REPEATS
    repeats_dir.mkdir(exist_ok=True)
    jobs = [(row, k) for row in range(n_q) for k in range(lc.repeats)]
    todo = [j for j in jobs if not repeat_path(repeats_dir, *j).is_file()]
    log.info("lissa: %d queries x %d repeats, %d to compute", n_q, lc.repeats, len(todo))
    record: dict[str, Any] = {
        "queries": n_q, "repeats": lc.repeats, "depth": lc.depth,
        "repeats_computed": 0, "repeats_reused": len(jobs) - len(todo), "repeats_lost": 0,
    }
    if todo:
        plan = start_workers(cfg.ray, faults=faults)  # one worker in process, or a Ray pool
        spec = LissaSpec(
            model=cfg.model, grad=cfg.grad, data=cfg.data, batch=cfg.batch,
            query_path=str(query_path), repeats_dir=str(repeats_dir), settings=settings,
            seed=lc.seed, micro_batch_size=lc.micro_batch_size, device=plan.device,
            torch_threads=plan.torch_threads,
        )
        size = min(plan.size, len(todo))
        pool = LissaPool(spec, size, num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
                         faults=faults, local=plan.in_process)  # fmt: skip
        try:
            record["top_eigenvalue_estimate"] = pool.call("scale_check")
            stats = pool.run(todo)
            record["worker_peak_rss_mib"] = pool.peak_rss()
        finally:
            pool.shutdown()
        record.update(repeats_computed=stats.computed, repeats_lost=stats.lost, workers=size,
                      lissa_seconds=round(stats.seconds, 3))
    missing = [j for j in jobs if not repeat_path(repeats_dir, *j).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} LiSSA repeats were never written (e.g. {missing[:3]})")

    for name in ("gradients.bin", "written.bin", "info.json"):  # an interrupted assembly
        (run.part / name).unlink(missing_ok=True)
    writer = GradientStoreWriter(
        run.part, num_items=n_q, grad_sizes=store.grad_sizes, dtype=store.dtype
    )
    for row in range(n_q):
        x = combine_repeats(
            [read_repeat(repeat_path(repeats_dir, row, k)) for k in range(lc.repeats)], lc.scale
        )
        writer.write_rows([row], _concat(x, store.grad_sizes)[None])
    writer.close()
    run.write_config(
        BuildConfig(model=cfg.model, data=cfg.query, batch=cfg.batch,
                    grad=dataclasses.replace(cfg.grad, attribute_tokens=False),
                    preprocess=PreprocessConfig(aggregation=cfg.query_aggregation), ray=cfg.ray),
        command="build",
    )
    save_processor(run.part, ProcessorConfig.from_gradient_config(cfg.grad))
    record["seconds"] = round(time.perf_counter() - t0, 3)
    run.write_summary({"command": "lissa", **record})
    shutil.rmtree(repeats_dir)
    (run.part / SETTINGS).unlink(missing_ok=True)
    return Path(run.commit()), record


def _concat(blocks: dict, grad_sizes: dict[str, int]):
    import torch

    return torch.cat([blocks[n].reshape(-1) for n in grad_sizes])


def lissa(cfg: LissaRunConfig | dict | None = None, *, faults: Any = None, **overrides: Any) -> Path:
    """Run the three steps (reusing finished ones under --resume); returns ``scores/``.

    ``bergson_ray.lissa(run_path="runs/lissa", **{"query.dataset": "q.jsonl"}, depth=1000)``
    (``faults``: tests only).
    """
    cfg = as_config(LissaRunConfig, cfg, **overrides)
    cfg = with_default_query(cfg, cfg.score.query_path)
    t0 = time.perf_counter()
    n_train = precheck(cfg)
    root = Path(cfg.run.run_path)
    steps = StepRecord(root, cfg.run, "lissa", STEPS)
    root.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"train_rows": n_train}

    if cfg.score.query_path:
        qpath = Path(cfg.score.query_path)
        log.info("lissa: using the existing query store %s", qpath)
    else:
        qpath = steps.path("query")
        if not steps.done("query"):
            qpath = _query_store(cfg, steps)

    tpath = steps.path("lissa_query")
    if not steps.done("lissa_query", ("query",)):
        tpath, record["lissa"] = solve_queries(
            cfg, qpath, steps.run_config("lissa_query"), faults=faults
        )

    spath = steps.path("scores")
    if not steps.done("scores", ("query", "lissa_query")):
        query = dataclasses.replace(cfg.score, query_path=str(tpath), higher_is_better=True)
        spath = score_step(cfg, steps.run_config("scores"), query)
    steps.write_summary(SUMMARY, record, t0)
    return Path(spath)


__all__ = ["lissa", "precheck", "solve_queries"]
