"""``trak``: TRAK attribution (Park et al. 2023) as bergson 2.5.1 runs it, on Ray.

One *member* per model (``--model`` alone, or each of ``--checkpoints``, member ``i``
projected with seed ``projection_seed + i``). Each member is a set of run directories::

    train/          gradient store of the training set: globally projected gradients of
                    the negative log-odds loss (``build`` on the worker pool)
    train_probs/    each training row's mean label-token probability p_i (a forward pass
                    on the same worker pool)
    train_hessian/  the Gram Φ_sᵀΦ_s / n_s of the first --stats_sample_size rows of
                    train/, as a dense processor dir both tools read ("joint" for bergson)
    query/          query gradients preconditioned with the Gram's inverse at build
                    (``build``, or ``reduce`` with --aggregation mean/sum)
    scores/         train/ scored against query/; a lone model's scores are weighted by
                    (1 - p_i) / mean|G⁻¹|, a member's are left unweighted

A lone model's steps live directly under ``RUN_PATH``; an ensemble's under
``RUN_PATH/checkpoint_<i>/``, and ``RUN_PATH/scores`` holds
``mean_i(S_i / scale_i) · mean_i(1 - p)`` (bergson's rule, math in
``hessians/gram.py``). Every scores dir carries bergson's ``trak_weights.npy`` and
``trak_scale.npy``.

Where bergson computes the training gradients twice (a Gram pass, then a score pass),
this builds the training store once and derives both from it on the driver: the Gram
is ``p x p`` and the scores one matrix product per chunk of rows.

``--resume`` reuses every finished step (so finished members are skipped whole) and
continues an unfinished ``train`` build; a step is recomputed when one it is made from
was. A member directory records its settings in ``member.json``; resuming it with other
settings is refused.

Here: the steps and the driver. Members and their bookkeeping: ``trak_members.py``; the
score stores: ``trak_scores.py``.
"""

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from ..config import BuildConfig, DataConfig, PreprocessConfig, RunConfig, as_config
from ..config.trak import TrakRunConfig
from ..errors import BadInputError, RunExistsError
from .stages import count_rows, with_default_query
from .trak_members import (
    CHUNK_ROWS,
    PROBS_NPY,
    STEPS,
    SUMMARY,
    Member,
    Steps,
    check_member_settings,
    commit_part,
    fresh_part,
    plan_members,
)
from .trak_scores import ensemble_scores, member_scores

log = logging.getLogger(__name__)

__all__ = ["STEPS", "trak"]


# -------------------------------------------------------------------------------- steps
def _build_cfg(
    cfg: TrakRunConfig, m: Member, run: RunConfig, data: DataConfig, pre: PreprocessConfig
) -> BuildConfig:
    return BuildConfig(
        run=run, model=m.model, data=data, grad=m.grad, batch=cfg.batch, preprocess=pre,
        ray=cfg.ray, skip_short_docs=cfg.skip_short_docs,
    )  # fmt: skip


def _train_store(cfg: TrakRunConfig, m: Member, steps: Steps) -> None:
    from .build import build

    if not steps.done("train"):
        build(_build_cfg(cfg, m, steps.run_config("train"), cfg.data, PreprocessConfig()))


def _label_probs(cfg: TrakRunConfig, m: Member, steps: Steps) -> None:
    """``train_probs/``: each row's p_i from a forward pass on the worker pool,
    one per row of ``train/`` (the rows the workers make, whatever the data options)."""
    from ..actors.label_probs import LabelProbs
    from ..store.gradient_store import GradientStore
    from .stages import runner_spec
    from .storage import cluster_probe
    from .workers import run_workers, start_workers, stream

    if steps.done("train_probs"):
        return
    n = GradientStore.open(m.path("train")).num_items
    final = m.path("train_probs")
    part = fresh_part(final)
    t0 = time.perf_counter()
    pool = start_workers(cfg.ray)  # Ray only when the pool needs it
    probe = None if pool.in_process else cluster_probe(part, cfg.data, m.model)
    spec = runner_spec(
        _build_cfg(cfg, m, RunConfig(), cfg.data, PreprocessConfig()), pool.device, None
    )
    out_ds = run_workers(
        np.arange(n), spec, LabelProbs(max_docs=cfg.loss_batch_size), cfg.ray, pool, probe=probe
    )
    probs = np.full(n, np.nan)
    for out in stream(out_ds, n, "trak p_i"):
        probs[out["idx"]] = out["prob"]
    if np.isnan(probs).any():
        raise RuntimeError(f"{int(np.isnan(probs).sum())} training rows got no label probability")
    np.save(part / PROBS_NPY, probs)
    (part / "summary.json").write_text(json.dumps({
        "command": "trak_label_probs", "model": m.model.model, "rows": n,
        "mean_prob": float(probs.mean()), "seconds": round(time.perf_counter() - t0, 3),
    }, indent=2) + "\n")  # fmt: skip
    commit_part(part, final)


def _gram(cfg: TrakRunConfig, m: Member, steps: Steps) -> None:
    """``train_hessian/``: the Gram of the first rows of ``train/`` (driver, chunked)."""
    from ..hessians.gram import GramSum
    from ..store.gradient_store import GradientStore
    from ..store.processor import ProcessorConfig, save_processor
    from ..store.run_dir import RunDir

    if steps.done("train_hessian", after=("train",)):
        return
    store = GradientStore.open(m.path("train"))
    n_s = min(cfg.stats_sample_size or store.num_grads, store.num_grads)
    acc = GramSum(store.total_dim)  # of the stored rows, whatever --loss_reduction (bergson's)
    for lo in range(0, n_s, CHUNK_ROWS):
        acc.add(store.rows(slice(lo, min(lo + CHUNK_ROWS, n_s))))
    gram = acc.matrix(n_s).float()
    run = RunDir(m.path("train_hessian"), overwrite=True)
    (name,) = store.grad_sizes  # the one global block ("gradients")
    save_processor(
        run.part,
        ProcessorConfig.from_gradient_config(m.grad),
        hessians={
            name: gram,
            "joint": gram.clone(),
        },  # ours reads the block's name, bergson "joint"
    )
    run.write_config(
        {"model": m.model, "data": cfg.data, "grad": m.grad, "batch": cfg.batch,
         "hessian": {"method": "autocorrelation", "use_dataset_labels": True},
         "stats_sample_size": n_s},
        command="hessian",
    )  # fmt: skip
    run.write_summary({"command": "trak_gram", "rows": n_s, "dim": store.total_dim})
    run.commit()


def _query_store(cfg: TrakRunConfig, m: Member, steps: Steps) -> Path:
    """``query/`` built with the Gram's inverse (bergson's order: precondition, then
    aggregate, then normalize), or the user's --query_path."""
    from .build import build
    from .reduce import reduce

    if cfg.score.query_path:
        return Path(cfg.score.query_path)
    if not steps.done("query", after=("train_hessian",)):
        pre = dataclasses.replace(
            cfg.preprocess, hessian_path=str(m.path("train_hessian")), unit_normalize=False
        )
        bcfg = _build_cfg(cfg, m, steps.run_config("query"), cfg.query, pre)
        (reduce if pre.aggregation != "none" else build)(bcfg)
    return m.path("query")


# ----------------------------------------------------------------------------- driver
def _refuse_existing(root: Path, cfg: TrakRunConfig) -> None:
    if cfg.run.resume or cfg.run.overwrite or not root.is_dir():
        return
    present = sorted(
        p.name for p in root.iterdir()
        if p.name.split(".")[0] in STEPS or p.name.startswith("checkpoint_")
    )  # fmt: skip
    if present:
        raise RunExistsError(
            f"{root} already holds trak steps ({', '.join(present[:4])}); pass --resume to "
            "reuse the finished ones or --overwrite to compute them again"
        )


def trak(cfg: TrakRunConfig | dict | None = None, **overrides) -> Path:
    """Run TRAK (every member, then the ensemble); returns the final ``scores/`` dir.

    ``bergson_ray.trak(run_path="runs/trak", checkpoints=["ckpt_a", "ckpt_b"])``
    """
    from .storage import is_uri

    cfg = as_config(TrakRunConfig, cfg, **overrides)
    cfg = with_default_query(cfg, cfg.score.query_path)
    if not cfg.run.run_path:
        raise BadInputError("run_path is required")
    if is_uri(cfg.run.run_path):
        raise BadInputError(
            "trak reads its stores on the driver: give a POSIX --run_path, not a URI"
        )
    if cfg.preprocess.unit_normalize:
        log.warning(
            "trak whitens with the inverse Gram: --unit_normalize is ignored (as in bergson)"
        )
        cfg = dataclasses.replace(
            cfg, preprocess=dataclasses.replace(cfg.preprocess, unit_normalize=False)
        )
    if cfg.score.query_path and len(cfg.checkpoints) > 1:
        raise BadInputError(
            "--query_path holds one projection, but every --checkpoints member has its own "
            "seed; drop --query_path and give --query.dataset"
        )
    t0 = time.perf_counter()
    n_train = count_rows(cfg.data, "training set")
    if not cfg.score.query_path:
        count_rows(cfg.query, "query set")
    members = plan_members(cfg)
    root = Path(cfg.run.run_path)
    _refuse_existing(root, cfg)
    root.mkdir(parents=True, exist_ok=True)

    for m in members:
        if m.index is not None:
            log.info("trak: member %d/%d: %s", m.index + 1, len(members), m.model.model)
        check_member_settings(cfg, m)
        steps = Steps(cfg, m)
        _train_store(cfg, m, steps)
        _label_probs(cfg, m, steps)
        _gram(cfg, m, steps)
        qpath = _query_store(cfg, m, steps)
        member_scores(cfg, m, steps, qpath, weighted=m.index is None)

    record: dict = {"train_rows": n_train, "ran": [], "reused": []}
    out = root / "scores"
    if len(members) > 1:
        fresh = any(m.ran for m in members)
        if cfg.run.resume and not cfg.run.overwrite and out.is_dir() and not fresh:
            record["reused"].append("scores")
        else:
            record["ran"].append("scores")
            out = ensemble_scores(cfg, members, root)
    record["members"] = [
        {"dir": str(m.root), "model": m.model.model, "projection_seed": m.grad.projection_seed,
         "ran": m.ran, "reused": m.reused}
        for m in members
    ]  # fmt: skip
    record["seconds"] = round(time.perf_counter() - t0, 3)
    (root / SUMMARY).write_text(json.dumps(record, indent=2) + "\n")
    log.info("trak: done in %.1fs -> %s", time.perf_counter() - t0, out)
    return out
