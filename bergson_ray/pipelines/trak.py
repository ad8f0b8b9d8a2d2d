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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import (
    BuildConfig,
    DataConfig,
    GradientConfig,
    ModelConfig,
    PreprocessConfig,
    RunConfig,
    as_config,
)
from ..config.trak import TrakRunConfig
from ..errors import BadInputError, RunExistsError, StoreError

log = logging.getLogger(__name__)

STEPS = ("train", "train_probs", "train_hessian", "query", "scores")
SUMMARY = "trak.json"
"""What the last invocation did per member: steps run and reused (for people and tests)."""
MEMBER_JSON = "member.json"
WEIGHTS_NPY, SCALE_NPY = "trak_weights.npy", "trak_scale.npy"
PROBS_NPY = "probs.npy"
CHUNK_ROWS = 16384
"""Store rows read at once on the driver (Gram and scores)."""
_CONFIG_NOISE = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype"}


@dataclass
class Member:
    """One model of the run and where its steps go."""

    root: Path
    model: ModelConfig
    grad: GradientConfig
    index: int | None = None
    """Position in --checkpoints; None for a lone --model."""
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)

    def path(self, step: str) -> Path:
        return self.root / step


# ----------------------------------------------------------------------------- planning
def _with_query_default(cfg: TrakRunConfig) -> TrakRunConfig:
    if cfg.query.dataset or cfg.score.query_path:
        return cfg
    if cfg.data.dataset != "tiny":
        raise BadInputError(
            "--query.dataset is required (or --query_path, an existing query store)"
        )
    from ..defaults.tiny import ensure_tiny_assets

    query = dataclasses.replace(cfg.query, dataset=str(ensure_tiny_assets().query_dir))
    return dataclasses.replace(cfg, query=query)


def _count_rows(data: DataConfig, what: str) -> int:
    """Rows of a dataset; an empty or unreadable one fails here with one sentence."""
    from ..data.loading import check_columns, load_dataset_rows

    ds = load_dataset_rows(data)
    check_columns(ds.column_names, data)
    if len(ds) == 0:
        raise BadInputError(
            f"the {what} {data.dataset!r} (split {data.split!r}) has no rows; TRAK needs at "
            f"least one {what.split()[0]} document"
        )
    return len(ds)


def _architecture(model: ModelConfig) -> dict:
    from .stages import model_config

    return {k: v for k, v in model_config(model).to_dict().items() if k not in _CONFIG_NOISE}


def plan_members(cfg: TrakRunConfig) -> list[Member]:
    """The members, each with its model and projection seed; checkpoints of different
    architectures are refused (their gradients would not live in one space)."""
    root = Path(cfg.run.run_path)
    if not cfg.checkpoints:
        return [Member(root, cfg.model, cfg.grad)]
    base = _architecture(dataclasses.replace(cfg.model, model=cfg.checkpoints[0]))
    for ckpt in cfg.checkpoints[1:]:
        other = _architecture(dataclasses.replace(cfg.model, model=ckpt))
        differ = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
        if differ:
            shown = ", ".join(f"{k}={base.get(k)!r} vs {other.get(k)!r}" for k in differ[:3])
            raise BadInputError(
                f"--checkpoints {cfg.checkpoints[0]!r} and {ckpt!r} have different "
                f"architectures ({shown}); TRAK ensembles checkpoints of one model"
            )
    seed0 = cfg.grad.projection_seed or 0
    return [
        Member(
            root / f"checkpoint_{i}",
            dataclasses.replace(cfg.model, model=ckpt),
            dataclasses.replace(cfg.grad, projection_seed=seed0 + i),
            index=i,
        )
        for i, ckpt in enumerate(cfg.checkpoints)
    ]


def _fingerprint(cfg: TrakRunConfig, m: Member) -> dict:
    """Everything that shapes a member's results (not where or how wide it runs)."""
    score = dataclasses.replace(cfg.score, top_k=0, bottom_k=0, query_batch_size=None)
    body = {
        "model": m.model, "grad": m.grad, "data": cfg.data, "query": cfg.query,
        "batch": cfg.batch, "preprocess": cfg.preprocess, "score": score,
        "stats_sample_size": cfg.stats_sample_size or None,
        "skip_short_docs": cfg.skip_short_docs,
    }  # fmt: skip
    return json.loads(json.dumps({k: _plain(v) for k, v in body.items()}))


def _plain(v):
    return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v


def _leaves(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_member_settings(cfg: TrakRunConfig, m: Member) -> None:
    """Refuse to resume a member made with other settings; record them otherwise."""
    now = _fingerprint(cfg, m)
    path = m.root / MEMBER_JSON
    if path.is_file() and cfg.run.resume and not cfg.run.overwrite:
        before, after = _leaves(json.loads(path.read_text())), _leaves(now)
        # keys only one side knows are settings another version added: not a difference
        diffs = [k for k in sorted(set(before) & set(after)) if before[k] != after[k]]
        if diffs:
            raise BadInputError(
                f"--resume: {m.root} was computed with other settings ({', '.join(diffs[:3])}); "
                "rerun with the same settings, or pass --overwrite to compute it again"
            )
    m.root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=2) + "\n")


# -------------------------------------------------------------------------------- steps
class Steps:
    """Which step of a member to reuse under --resume, and the sub-run of one to compute."""

    def __init__(self, cfg: TrakRunConfig, m: Member):
        self.resume = cfg.run.resume and not cfg.run.overwrite
        self.m = m

    def done(self, name: str, after: tuple[str, ...] = ()) -> bool:
        if self.resume and self.m.path(name).is_dir() and not any(d in self.m.ran for d in after):
            log.info("trak: reusing finished step %s", self.m.path(name))
            self.m.reused.append(name)
            return True
        self.m.ran.append(name)
        return False

    def run_config(self, name: str) -> RunConfig:
        """Replace a stale result; continue an unfinished one under --resume."""
        stale = self.m.path(name).exists()
        return RunConfig(
            run_path=str(self.m.path(name)), overwrite=True, resume=self.resume and not stale
        )


def _fresh_part(final: Path) -> Path:
    part = final.with_name(final.name + ".part")
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    return part


def _commit(part: Path, final: Path) -> Path:
    if final.exists():
        shutil.rmtree(final)
    os.replace(part, final)
    return final


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
    part = _fresh_part(final)
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
    _commit(part, final)


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


def _member_scores(cfg: TrakRunConfig, m: Member, steps: Steps, weighted: bool) -> None:
    """``scores/``: the training store against the query, weighted by (1 - p)/scale
    for a lone model, unweighted (plus the weights and scale) for an ensemble member."""
    from ..gradients.scoring import num_score_columns, score_rows
    from ..hessians.gram import inverse_gram, inverse_scale, trak_weights, weight_scores
    from ..store.gradient_store import GradientStore
    from ..store.processor import load_hessians

    qpath = _query_store(cfg, m, steps)
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
    _write_score_store(
        cfg,
        m.path("scores"),
        m,
        store.num_grads,
        cols,
        chunks(),
        extras,
        summary={"queries": int(len(query)), "weighted": weighted, "scale": scale},
    )


def _write_score_store(
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


def _ensemble_scores(cfg: TrakRunConfig, members: list[Member], root: Path) -> Path:
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
    return _write_score_store(
        cfg,
        root / "scores",
        members[0],
        n,
        cols,
        chunks(),
        extras,
        summary={"members": len(members), "scales": scales},
    )


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

    cfg = _with_query_default(as_config(TrakRunConfig, cfg, **overrides))
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
    n_train = _count_rows(cfg.data, "training set")
    if not cfg.score.query_path:
        _count_rows(cfg.query, "query set")
    members = plan_members(cfg)
    root = Path(cfg.run.run_path)
    _refuse_existing(root, cfg)
    root.mkdir(parents=True, exist_ok=True)

    for m in members:
        if m.index is not None:
            log.info("trak: member %d/%d: %s", m.index + 1, len(members), m.model.model)
        _check_member_settings(cfg, m)
        steps = Steps(cfg, m)
        _train_store(cfg, m, steps)
        _label_probs(cfg, m, steps)
        _gram(cfg, m, steps)
        _member_scores(cfg, m, steps, weighted=m.index is None)

    record: dict = {"train_rows": n_train, "ran": [], "reused": []}
    out = root / "scores"
    if len(members) > 1:
        fresh = any(m.ran for m in members)
        if cfg.run.resume and not cfg.run.overwrite and out.is_dir() and not fresh:
            record["reused"].append("scores")
        else:
            record["ran"].append("scores")
            out = _ensemble_scores(cfg, members, root)
    record["members"] = [
        {"dir": str(m.root), "model": m.model.model, "projection_seed": m.grad.projection_seed,
         "ran": m.ran, "reused": m.reused}
        for m in members
    ]  # fmt: skip
    record["seconds"] = round(time.perf_counter() - t0, 3)
    (root / SUMMARY).write_text(json.dumps(record, indent=2) + "\n")
    log.info("trak: done in %.1fs -> %s", time.perf_counter() - t0, out)
    return out
