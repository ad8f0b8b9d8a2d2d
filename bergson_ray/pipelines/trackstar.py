"""``trackstar``: TrackStar attribution (Chang et al. 2024) as bergson 2.5.1 runs it.

Steps, each a run directory under ``RUN_PATH``::

    value_hessian/   autocorrelation Hessian of the first --stats_sample_size training rows
    query_hessian/   the same on the query set            } fitted at the same time on Ray
    mixed_hessian/   λ·H_query + (1-λ)·H_value (bergson's λ rule; ``mix``)
    query/           query gradients preconditioned at build: H⁻¹ (inner product) or
                     H^-½ and unit norm (--unit_normalize, cosine); aggregated if asked
    scores/          every training row scored against query/ (H^-½ and unit norm on the
                     training side too when cosine)

``--mix_hessians false`` skips query_hessian/ and mixed_hessian/ and preconditions with
value_hessian/. ``--optimizer_state`` normalizes every gradient of every step (both
Hessians see the rows the stores hold). ``--resume`` reuses finished steps and continues
an unfinished build or score; without it (or --overwrite) an existing run is refused.

The two Hessian fits are independent, so two driver threads run the ``hessian``
pipeline at once: each starts its own (unnamed) workers and shards on the shared Ray
cluster, and their work overlaps instead of queueing step after step.

One difference from bergson: the Hessians use the first N rows *of the given split*
(``train[:24]`` with N = 10000 stays 24 rows); bergson's rewrite of the split to
``train[:N]`` would read rows the user excluded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..config import (
    BuildConfig,
    DataConfig,
    HessianConfig,
    HessianRunConfig,
    RunConfig,
    as_config,
)
from ..config.trackstar import MixConfig, TrackstarRunConfig
from ..errors import BadInputError
from .stages import with_default_query
from .steps import StepRecord, score_step

log = logging.getLogger(__name__)

STEPS = ("value_hessian", "query_hessian", "mixed_hessian", "query", "scores")
SUMMARY = "trackstar.json"
"""What the last invocation did: steps run and reused, λ, the Hessian used (for people and tests)."""


def first_rows(data: DataConfig, n: int | None) -> DataConfig:
    """``data`` limited to the first ``n`` rows of its split (slices and ``+`` respected)."""
    if not n:
        return data
    import datasets

    from ..data.loading import load_dataset_rows

    try:
        instruction = datasets.ReadInstruction.from_spec(data.split)
    except (ValueError, AssertionError) as exc:
        raise BadInputError(f"invalid split {data.split!r}: {exc}") from exc
    names = {part.split("[", 1)[0].strip() for part in data.split.split("+")}
    sizes = {name: len(load_dataset_rows(dataclasses.replace(data, split=name))) for name in names}
    pieces, left = [], n
    for a in instruction.to_absolute(sizes):
        take = min(left, a.to - a.from_)
        if take <= 0:
            break
        pieces.append(f"{a.splitname}[{a.from_}:{a.from_ + take}]")
        left -= take
    return dataclasses.replace(data, split="+".join(pieces)) if pieces else data


def _names_other_hessian(step: Path, hessian: Path) -> bool:
    """Whether a finished step was made with another Hessian than ``hessian`` (a run
    resumed with other --mix_hessians); its ``config.yaml`` names the one it used."""
    cfg_file = step / "config.yaml"
    return step.is_dir() and (not cfg_file.is_file() or str(hessian) not in cfg_file.read_text())


def _hessian_cfg(cfg: TrackstarRunConfig, data: DataConfig, path: Path) -> HessianRunConfig:
    return HessianRunConfig(
        # Only reached when the step must be (re)computed: a stale .part is replaced.
        run=RunConfig(run_path=str(path), overwrite=True),
        model=cfg.model,
        data=data,
        grad=cfg.grad,
        batch=cfg.batch,
        hessian=HessianConfig(method="autocorrelation"),
        ray=cfg.ray,
        skip_short_docs=cfg.skip_short_docs,
    )


def fit_concurrently(jobs: list[HessianRunConfig]) -> None:
    """Run the ``hessian`` pipeline on every config at once (one driver thread each)."""
    from .hessian import hessian

    if len(jobs) <= 1:
        for job in jobs:
            hessian(job)
        return
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="trackstar-hessian") as ex:
        futures = [ex.submit(hessian, job) for job in jobs]
        errors = [f.exception() for f in futures]  # waits for all: no fit left running
    for err in errors:
        if err is not None:
            raise err


def _query_store(cfg: TrackstarRunConfig, steps: StepRecord, pre) -> Path:
    from .build import build
    from .reduce import reduce

    bcfg = BuildConfig(
        run=steps.run_config("query"),
        model=cfg.model,
        data=cfg.query,
        grad=cfg.grad,
        batch=cfg.batch,
        preprocess=pre,
        ray=cfg.ray,
        skip_short_docs=cfg.skip_short_docs,
    )
    return reduce(bcfg) if pre.aggregation != "none" else build(bcfg)


def _check_data(cfg: TrackstarRunConfig) -> tuple[int, int | None]:
    """Row counts of the training and query sets; an empty or unreadable one fails here,
    before any step runs, with the loader's one-sentence error."""
    from ..data.loading import check_columns, load_dataset_rows

    train = load_dataset_rows(cfg.data)
    check_columns(train.column_names, cfg.data)
    if not cfg.query.dataset:
        return len(train), None
    query = load_dataset_rows(cfg.query)
    check_columns(query.column_names, cfg.query)
    return len(train), len(query)


def trackstar(cfg: TrackstarRunConfig | dict | None = None, **overrides) -> Path:
    """Run the five steps (reusing finished ones under --resume); returns ``scores/``.

    ``bergson_ray.trackstar(run_path="runs/ts", **{"query.dataset": "q.jsonl"})``
    """
    from ..utils.ray_env import init_ray
    from .in_process import runs_in_process
    from .mix import mix_dirs, rank_warning

    cfg = as_config(TrackstarRunConfig, cfg, **overrides)
    cfg = with_default_query(cfg, cfg.score.query_path)
    if not cfg.run.run_path:
        raise BadInputError("run_path is required")
    t0 = time.perf_counter()
    n_train, n_query = _check_data(cfg)
    if cfg.mix_hessians and n_query is None:
        raise BadInputError(
            "--mix_hessians needs the query set (--query.dataset) to fit the query Hessian; "
            "pass it or --mix_hessians false"
        )
    root = Path(cfg.run.run_path)
    steps = StepRecord(root, cfg.run, "trackstar", STEPS)
    root.mkdir(parents=True, exist_ok=True)
    record: dict = {"train_rows": n_train, "query_rows": n_query}

    jobs = []
    if not steps.done("value_hessian"):
        data = first_rows(cfg.data, cfg.stats_sample_size)
        jobs.append(_hessian_cfg(cfg, data, steps.path("value_hessian")))
    if cfg.mix_hessians and not steps.done("query_hessian"):
        data = first_rows(cfg.query, cfg.stats_sample_size)
        jobs.append(_hessian_cfg(cfg, data, steps.path("query_hessian")))
    if jobs:
        if not runs_in_process(cfg.ray):  # Ray once, before the threads
            init_ray(cfg.ray.address, namespace=cfg.ray.namespace)
        fit_concurrently(jobs)

    hessian_path = steps.path("value_hessian")
    if cfg.mix_hessians:
        hessian_path = steps.path("mixed_hessian")
        if steps.done("mixed_hessian", after=("value_hessian", "query_hessian")):
            done = hessian_path / "summary.json"
            if done.is_file():
                record["mixing_coefficient"] = json.loads(done.read_text()).get(
                    "mixing_coefficient"
                )
        else:
            _, choice = mix_dirs(
                MixConfig(
                    query_path=str(steps.path("query_hessian")),
                    index_path=str(steps.path("value_hessian")),
                    output_path=str(hessian_path),
                    target_downweight_components=cfg.target_downweight_components,
                    overwrite=True,
                )
            )
            record["mixing_coefficient"] = choice.lam
            warning = rank_warning(choice)
            if warning and n_query is not None:
                log.warning(
                    "trackstar: %d query rows are too few for the mix: %s", n_query, warning
                )
    record["hessian_path"] = str(hessian_path)

    pre = dataclasses.replace(cfg.preprocess, hessian_path=str(hessian_path))
    if cfg.score.query_path:
        qpath = Path(cfg.score.query_path)
        log.info("trackstar: scoring against the existing query store %s", qpath)
    else:
        qpath = steps.path("query")
        if not steps.done("query", ("value_hessian", "mixed_hessian"),
                          stale=_names_other_hessian(steps.path("query"), hessian_path)):
            qpath = _query_store(cfg, steps, pre)

    spath = steps.path("scores")
    if not steps.done("scores", ("value_hessian", "mixed_hessian", "query"),
                          stale=_names_other_hessian(steps.path("scores"), hessian_path)):
        query = dataclasses.replace(cfg.score, query_path=str(qpath), higher_is_better=True)
        spath = score_step(cfg, steps.run_config("scores"), query, pre)
    steps.write_summary(SUMMARY, record, t0)
    return Path(spath)
