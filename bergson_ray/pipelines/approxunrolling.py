"""``approxunrolling``: SOURCE (Bae et al. 2024) as bergson 2.5.1 runs it, on Ray.

``C`` checkpoints (in training order) are split into ``L`` segments. Everything lands
under ``RUN_PATH`` in bergson's layout, each piece written as ``X.part`` and renamed when
complete::

    exported/checkpoint-<N>/                 step_<N>.ckpt states of `bergson-ray train` as HF dirs
    query/                                   query gradients at the last checkpoint (full, --aggregation)
    segment_<l>/ckpt_<i>/<method>/           factor sums at checkpoint i of segment l   (pass 1)
        averaged_ev_correct_sharded/         its Σ_n (Q_Gᵀ G_n Q_A)² in the segment basis (pass 2)
    segment_<l>/<method>/                    the segment's factors, eigenbases (pooled covariances)
        eigenvalue_correction_sharded/       and per-document mean EK-FAC eigenvalues σ_l
    segment_<l>/preconditioner.safetensors   Adam variant: P = 1/(√(v̂ + eps_root) + eps)
    segment_<l>/query_grad_backward/         q_l = F_backward(segment l+1) q_{l+1}   (l < L-1)
    segment_<l>/query_grad_segment/          q̃_l = F_segment(segment l) q_l
    segment_<l>/scores_ckpt_<i>/             ⟨g_c(z), q̃_l⟩ of every training row at checkpoint c (pass 3)
    scores/                                  -Σ_l mean_c of those: loss-signed, higher_is_better false
    approxunrolling.json                     what this invocation ran and reused

The three passes over the training data run on one pool of actors
(``actors/unrolling_worker.py``; jobs are chunks of rows at one checkpoint, so all
checkpoints' fits proceed in parallel); the math is ``bergson_ray/unrolling``. The
query is built by the ``build`` / ``reduce`` pipelines before the pool starts. ``--resume``
reuses every finished piece (a per-checkpoint fit, a segment, the query, a checkpoint's
scores) unless something it is made from was recomputed; without it (or ``--overwrite``)
an existing run is refused. All settings are checked, checkpoints found, architectures
compared and learning rates read before Ray starts (``approxunrolling_plan.py``: the
plan and the run directory's pieces; here the passes, the driver-side math and the
command).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..config import BuildConfig, PreprocessConfig, RunConfig, as_config
from ..config.approxunrolling import ApproxUnrollingRunConfig
from ..errors import BadInputError, StoreError
from ..unrolling import checkpoints as ck
from .approxunrolling_plan import (
    COMMAND,
    CONFIG_YAML,
    SUMMARY,
    Plan,
    Steps,
    ckpt_dir,
    plan_run,
    seg_dir,
)
from .stages import with_default_query

log = logging.getLogger(__name__)

LAMBDA_DIR = "averaged_ev_correct_sharded"
"""bergson's name for a checkpoint's EK-FAC sums in its segment's eigenbasis."""
CORRECTION_DIR = "eigenvalue_correction_sharded"
PRECONDITIONER = "preconditioner.safetensors"
CKPT_INFO = "unrolling.json"
MAX_CHUNKS = 16
"""Jobs per checkpoint and pass at most: each factor job returns a full set of factor
sums, so the traffic is bounded by this, whatever the dataset size."""


# ------------------------------------------------------------------------------ the pieces


def _write_config(root: Path, cfg: ApproxUnrollingRunConfig) -> None:
    from ..store.run_dir import run_metadata

    doc = {"steps": [{COMMAND: dataclasses.asdict(cfg)}], "metadata": run_metadata()}
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{CONFIG_YAML}.part"
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, root / CONFIG_YAML)


def _export(plan: Plan, steps: Steps) -> None:
    for c, dest in zip(plan.checkpoints, plan.hf_dirs):
        if not c.train_state:
            continue
        name = str(dest.relative_to(steps.root))
        if steps.reuse(name):
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.info("approxunrolling: exporting %s as an HF dir", c.source)
        ck.export_train_state(c, plan.base_model, dest)


def _query(cfg: ApproxUnrollingRunConfig, plan: Plan, steps: Steps, pool, last: int) -> Path:
    """Query gradients at the last checkpoint (full, ``--aggregation``), computed on the
    pool and written as a ``build`` (or ``reduce``) store would be (step 5)."""
    from ..actors.unrolling_worker import PassJob
    from ..store.config_yaml import build_step_body
    from ..store.gradient_writer import GradientStoreWriter
    from ..store.processor import ProcessorConfig, save_processor
    from ..store.run_dir import RunDir
    from ..unrolling.aggregation import OrderedSum

    if cfg.query_path:
        return Path(cfg.query_path)
    path = steps.root / "query"
    if steps.reuse("query", after=[_exported(plan, last, steps)]):
        return path
    n = int(plan.num_queries or 0)
    chunks = _chunks(n, cfg.ray.window_size)
    summed = cfg.aggregation != "none"
    run = RunDir(path, overwrite=True)
    writer = GradientStoreWriter(run.part, num_items=1 if summed else n, grad_sizes=plan.layout)
    total = OrderedSum(len(chunks))

    def on_result(job, res) -> None:
        if summed:
            total.add(job.chunk, res["state"], documents=res["documents"])
        else:
            writer.write_rows(res["idx"], res["grads"])

    jobs = [PassJob("query", last, k, lo, hi, "sum" if summed else "") for k, (lo, hi) in enumerate(chunks)]
    log.info("approxunrolling: query gradients of %d rows at %s", n, plan.hf_dirs[last])
    pool.run(jobs, on_result)
    if summed:
        row = total.result()["query"]["sum"]
        if cfg.aggregation == "mean":
            row = row / n  # bergson divides by the query set's size, short documents included
        writer.write_rows([0], row[None].to(torch.float32).numpy())
    writer.close()
    record = BuildConfig(
        run=RunConfig(run_path=str(path)),
        model=dataclasses.replace(cfg.model, model=str(plan.hf_dirs[last])),
        data=cfg.query, grad=cfg.grad, batch=cfg.batch,
        preprocess=PreprocessConfig(aggregation=cfg.aggregation), ray=cfg.ray,
        skip_short_docs=cfg.skip_short_docs,
    )  # fmt: skip
    run.write_config(build_step_body(record), command="build")
    save_processor(run.part, ProcessorConfig.from_gradient_config(cfg.grad))
    return Path(run.commit())


def _check_query(path: Path, plan: Plan):
    from ..store.gradient_store import GradientStore

    store = GradientStore.open(path)
    want = {n: s.out_features * s.in_dim for n, s in plan.specs.items()}
    if store.attribute_tokens or any(store.grad_sizes.get(n) != d for n, d in want.items()):
        raise BadInputError(
            f"query store {path} does not hold full per-document gradients of the fitted modules; "
            "build it with --projection_dim 0 and the same --include_bias / --modules"
        )
    if store.num_grads == 0:
        raise BadInputError(f"query store {path} has no rows")
    return store


def _chunks(n: int, window: int) -> list[tuple[int, int]]:
    k = min(MAX_CHUNKS, max(1, -(-n // max(1, window))))
    bounds = np.linspace(0, n, k + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _sum_pass(pool, kind: str, todo: list[int], chunks, source: Callable[[int], str],
              done: Callable[[int, Any], None]) -> None:  # fmt: skip
    """Run one summing pass over the checkpoints ``todo``; ``done(c, OrderedSum)`` as
    soon as a checkpoint's chunks are all in."""
    from ..actors.unrolling_worker import PassJob
    from ..unrolling.aggregation import OrderedSum

    if not todo:
        return
    sums = {c: OrderedSum(len(chunks)) for c in todo}
    jobs = [PassJob(kind, c, k, lo, hi, source(c)) for c in todo for k, (lo, hi) in enumerate(chunks)]  # type: ignore[arg-type]

    def on_result(job, res) -> None:
        if sums[job.checkpoint].add(job.chunk, res["state"], documents=res["documents"],
                                    positions=res["positions"]):  # fmt: skip
            done(job.checkpoint, sums.pop(job.checkpoint))

    log.info("approxunrolling: %s pass over %d checkpoint(s), %d jobs", kind, len(todo), len(jobs))
    pool.run(jobs, on_result)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in sorted(tensors.items())}, str(path))


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise StoreError(f"{path} is missing; rerun with --resume to recompute it")
    return load_file(str(path))


def _factor_pass(cfg, plan: Plan, steps: Steps, pool, chunks) -> None:
    from ..store.processor import write_total_processed
    from ..unrolling.aggregation import finalize_factors
    from ..utils.dtypes import torch_dtype

    method, dtype = cfg.hessian.method, torch_dtype(cfg.hessian.hessian_dtype)
    todo = [c for c in range(len(plan.checkpoints))
            if not steps.reuse(ckpt_dir(plan, c, method), after=[_exported(plan, c, steps)])]  # fmt: skip

    def done(c: int, total) -> None:
        factors = finalize_factors(total.result(), plan.specs, cfg.hessian)
        name = ckpt_dir(plan, c, method)
        part = steps.part(name)
        _save({n: f.A.to(dtype) for n, f in factors.items()}, part / "activation_sharded" / "shard_0.safetensors")
        _save({n: f.S.to(dtype) for n, f in factors.items()}, part / "gradient_sharded" / "shard_0.safetensors")
        write_total_processed(part, total.extra["positions"])
        info = {"checkpoint": str(plan.hf_dirs[c]), "documents": total.extra["documents"],
                "positions": total.extra["positions"], "counts": {n: f.count for n, f in factors.items()}}  # fmt: skip
        (part / CKPT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        steps.commit(name)

    _sum_pass(pool, "factors", todo, chunks, lambda c: "", done)


def _exported(plan: Plan, c: int, steps: Steps) -> str:
    return str(plan.hf_dirs[c].relative_to(steps.root)) if plan.checkpoints[c].train_state else ""


def _read_ckpt_factors(root: Path, name: str):
    from ..hessians.accumulator import Factors

    info = json.loads((root / name / CKPT_INFO).read_text())
    a = _load(root / name / "activation_sharded" / "shard_0.safetensors")
    s = _load(root / name / "gradient_sharded" / "shard_0.safetensors")
    return {n: Factors(a[n], s[n], int(info["counts"][n])) for n in a}, int(info["documents"])


def _segments(cfg, plan: Plan, steps: Steps) -> None:
    """Each segment's eigenbases from its checkpoints' pooled covariances (step 2)."""
    from ..hessians.factored_io import shard_slices, write_info, write_shard_file
    from ..store.processor import write_total_processed
    from ..unrolling.aggregation import segment_factors
    from ..utils.dtypes import torch_dtype

    method = cfg.hessian.method
    for sg, group in enumerate(plan.groups):
        deps = [ckpt_dir(plan, c, method) for c in group]
        if steps.reuse(seg_dir(sg, method), after=deps):
            continue
        read = [_read_ckpt_factors(steps.root, d) for d in deps]
        factors = segment_factors([f for f, _ in read], [d for _, d in read],
                                  dtype=torch_dtype(cfg.hessian.hessian_dtype))  # fmt: skip
        part = steps.part(seg_dir(sg, method))
        write_shard_file(part, 0, [shard_slices(factors, 0, 1)])
        write_total_processed(part, sum(int(next(iter(f.values())).count) for f, _ in read))
        write_info(part, {
            "format": "factored (bergson sharded safetensors)", "method": method,
            "ev_correction": True, "hessian_dtype": cfg.hessian.hessian_dtype,
            "num_documents": sum(d for _, d in read), "segment": sg,
            "checkpoints": [str(plan.hf_dirs[c]) for c in group],
            "scale": "eigenvalue grids are per-document means over the segment's checkpoints",
        })  # fmt: skip
        steps.commit(seg_dir(sg, method))


def _lambda_pass(cfg, plan: Plan, steps: Steps, pool, chunks) -> None:
    """Each checkpoint's EK-FAC sums in its segment's eigenbasis (step 3)."""
    from ..utils.dtypes import torch_dtype

    method, dtype = cfg.hessian.method, torch_dtype(cfg.hessian.hessian_dtype)
    todo = []
    for c in range(len(plan.checkpoints)):
        sg, _ = plan.segment_of(c)
        name = f"{ckpt_dir(plan, c, method)}/{LAMBDA_DIR}"
        if not steps.reuse(name, after=[seg_dir(sg, method), ckpt_dir(plan, c, method)]):
            todo.append(c)

    def done(c: int, total) -> None:
        name = f"{ckpt_dir(plan, c, method)}/{LAMBDA_DIR}"
        part = steps.part(name)
        _save({n: st["lambda"].to(dtype) for n, st in total.result().items()}, part / "shard_0.safetensors")
        docs = int(total.extra["documents"])
        torch.save(torch.tensor(docs), part / "documents_processed.pt")  # bergson's normalizer
        (part / "documents.json").write_text(json.dumps({"documents": docs}) + "\n")
        steps.commit(name)

    _sum_pass(pool, "lambda", todo, chunks,
              lambda c: str(steps.root / seg_dir(plan.segment_of(c)[0], method)), done)  # fmt: skip


def _segment_lambdas(cfg, plan: Plan, steps: Steps) -> None:
    """σ_l = Σ_c Λ_c / Σ_c D_c into the segment dir (step 4)."""
    from ..unrolling.aggregation import segment_lambdas
    from ..utils.dtypes import torch_dtype

    method = cfg.hessian.method
    for sg, group in enumerate(plan.groups):
        deps = [f"{ckpt_dir(plan, c, method)}/{LAMBDA_DIR}" for c in group]
        name = f"{seg_dir(sg, method)}/{CORRECTION_DIR}"
        if steps.reuse(name, after=[*deps, seg_dir(sg, method)]):
            continue
        sums = [_load(steps.root / d / "shard_0.safetensors") for d in deps]
        docs = [json.loads((steps.root / d / "documents.json").read_text())["documents"] for d in deps]
        lam = segment_lambdas(sums, docs, dtype=torch_dtype(cfg.hessian.hessian_dtype))
        part = steps.part(name)
        _save(lam, part / "shard_0.safetensors")
        steps.commit(name)


def _preconditioners(cfg, plan: Plan, steps: Steps) -> list[dict[str, torch.Tensor] | None]:
    """Adam variant: each segment's ``P`` on the gradient grids (bergson's file)."""
    from ..unrolling.adam import bias_corrected, mean_moments, module_grid, preconditioner

    if not cfg.use_adam_preconditioner:
        return [None] * len(plan.groups)
    out: list[dict[str, torch.Tensor] | None] = []
    for sg, group in enumerate(plan.groups):
        name = f"{seg_dir(sg)}/{PRECONDITIONER}"
        path = steps.root / name
        if steps.reuse(name, after=[_exported(plan, c, steps) for c in group]):
            out.append(_load(path))
            continue
        v_hats, eps, eps_root = [], 0.0, 0.0
        for c in group:
            sm = ck.read_second_moments(plan.checkpoints[c], plan.record)
            v_hats.append({k: bias_corrected(v, sm.step, sm.beta2) for k, v in sm.moments.items()})
            eps, eps_root = sm.eps, sm.eps_root
        p = {k: preconditioner(v, eps, eps_root) for k, v in mean_moments(v_hats).items()}
        grids = {}
        for module, (weight, bias, conv) in plan.params.items():
            if weight not in p or (bias is not None and bias not in p):
                raise BadInputError(
                    f"the optimizer state of segment {sg} has no second moments for {bias if weight in p else weight}"
                )
            spec = plan.specs[module]
            grids[module] = module_grid(
                p[weight], p[bias] if bias else None, spec.out_features, spec.in_features,
                transposed=conv, name=module,
            ).to(torch.float32)  # fmt: skip
        tmp = path.with_name(path.name + ".part")
        _save(grids, tmp)
        os.replace(tmp, path)
        out.append(grids)
    return out


def _walk_names(plan: Plan) -> list[str]:
    n = len(plan.groups)
    return [f"{seg_dir(sg)}/query_grad_backward" for sg in range(n - 1)] + [
        f"{seg_dir(sg)}/query_grad_segment" for sg in range(n)
    ]


def _walk(cfg, plan: Plan, steps: Steps, query_path: Path, grids) -> None:
    """Phase 1 and 2 (steps 6 and 7) for every query row, on the driver."""
    from ..hessians.factored_io import read_factored
    from ..store.gradient_writer import GradientStoreWriter
    from ..store.processor import ProcessorConfig, save_processor
    from ..unrolling.walk import Segment, SegmentOperator, walk

    method = cfg.hessian.method
    names = _walk_names(plan)
    deps = [f"{seg_dir(sg, method)}/{CORRECTION_DIR}" for sg in range(len(plan.groups))]
    deps += [f"{seg_dir(sg)}/{PRECONDITIONER}" for sg in range(len(plan.groups))] + ["query"]
    reused = [steps.reuse(n, after=deps) for n in names]
    if all(reused):
        return
    for n, r in zip(names, reused):
        if r:  # recompute the whole walk together
            steps.reused.remove(n)
            steps.ran.append(n)
    store = _check_query(query_path, plan)
    operators = [
        SegmentOperator(
            Segment(read_factored(steps.root / seg_dir(sg, method)), plan.lr_times_steps[sg], grids[sg]),
            inversion=cfg.inversion, damping_factor=cfg.damping_factor,
        )  # fmt: skip
        for sg in range(len(plan.groups))
    ]
    sizes = dict(plan.layout)  # the training rows' layout: what the score pass dots with
    writers = {
        n: GradientStoreWriter(steps.part(n), num_items=store.num_grads, grad_sizes=sizes)
        for n in names
    }
    columns = store.column_offsets
    for lo in range(0, store.num_grads, cfg.apply_batch_size):
        hi = min(lo + cfg.apply_batch_size, store.num_grads)
        rows = store.rows(np.arange(lo, hi)).float()
        blocks = {n: rows[:, columns[n][0]: columns[n][1]] for n in sizes}
        walked, transformed = walk(blocks, operators)
        for sg in range(len(plan.groups)):
            outs = [(f"{seg_dir(sg)}/query_grad_segment", transformed[sg])]
            if sg < len(plan.groups) - 1:
                outs.append((f"{seg_dir(sg)}/query_grad_backward", walked[sg]))
            for name, b in outs:
                writers[name].write_rows(np.arange(lo, hi), torch.cat([b[m] for m in sizes], dim=1).numpy())
    proc = ProcessorConfig.from_gradient_config(cfg.grad)
    for name, w in writers.items():
        w.close()
        save_processor(steps.root / f"{name}.part", proc)
        steps.commit(name)


def _score_pass(cfg, plan: Plan, steps: Steps, pool, chunks, num_queries: int) -> None:
    """Every training row at every checkpoint against its segment's q̃ (step 8)."""
    from ..actors.unrolling_worker import PassJob
    from ..store.score_writer import ScoreWriter

    todo = []
    for c in range(len(plan.checkpoints)):
        sg, i = plan.segment_of(c)
        name = f"{seg_dir(sg)}/scores_ckpt_{i}"
        if not steps.reuse(name, after=[*_walk_names(plan), _exported(plan, c, steps)]):
            todo.append(c)
    if not todo:
        return
    writers: dict[int, ScoreWriter] = {}
    left = {c: len(chunks) for c in todo}

    def name_of(c: int) -> str:
        sg, i = plan.segment_of(c)
        return f"{seg_dir(sg)}/scores_ckpt_{i}"

    for c in todo:
        writers[c] = ScoreWriter(steps.part(name_of(c)), plan.num_docs, num_queries)

    def on_result(job, res) -> None:
        writers[job.checkpoint].write(res["idx"], res["scores"])
        left[job.checkpoint] -= 1
        if left[job.checkpoint] == 0:
            c = job.checkpoint
            writers.pop(c).close()
            sg, _ = plan.segment_of(c)
            doc = {"steps": [{"score": {
                "model": str(plan.hf_dirs[c]),
                "score_cfg": {"query_path": str(steps.root / seg_dir(sg) / "query_grad_segment"),
                              "score": "individual", "higher_is_better": True},
            }}]}  # fmt: skip
            (steps.root / f"{name_of(c)}.part" / CONFIG_YAML).write_text(yaml.safe_dump(doc, sort_keys=False))
            steps.commit(name_of(c))

    jobs = [
        PassJob("scores", c, k, lo, hi, str(steps.root / seg_dir(plan.segment_of(c)[0]) / "query_grad_segment"))
        for c in todo for k, (lo, hi) in enumerate(chunks)
    ]  # fmt: skip
    log.info("approxunrolling: scores pass over %d checkpoint(s), %d jobs", len(todo), len(jobs))
    pool.run(jobs, on_result)


def _final_scores(cfg, plan: Plan, steps: Steps) -> Path:
    """``-Σ_l mean_c ⟨g_c, q̃_l⟩``, loss-signed (bergson orients and sums the same way)."""
    from ..store.run_dir import RunDir
    from ..store.score_store import ScoreStore
    from ..store.score_writer import ScoreWriter

    total: np.ndarray | None = None
    for sg, group in enumerate(plan.groups):
        seg = None
        for i in range(len(group)):
            store = ScoreStore.open(steps.root / seg_dir(sg) / f"scores_ckpt_{i}")
            if not store.is_complete():
                raise StoreError(f"{store.path} is incomplete; rerun with --resume")
            s = store.scores.astype(np.float64)
            seg = s if seg is None else seg + s
        seg = seg / len(group)  # type: ignore[operator]
        total = seg if total is None else total + seg
    assert total is not None
    run = RunDir(steps.root / "scores", overwrite=True)
    with ScoreWriter(run.part, total.shape[0], total.shape[1]) as w:
        w.write(np.arange(total.shape[0]), (-total).astype(np.float32))
    run.write_config({**dataclasses.asdict(cfg), "score_cfg": {"higher_is_better": False}},
                     command=COMMAND)  # fmt: skip
    return Path(run.commit())


# ------------------------------------------------------------------------------ the command


def approxunrolling(
    cfg: ApproxUnrollingRunConfig | dict | None = None, *, faults: Any = None, **overrides: Any
) -> Path:
    """Run SOURCE end to end (reusing finished pieces under --resume); returns ``scores/``.

    ``bergson_ray.approxunrolling(run_path="runs/src", checkpoints=["runs/train"], segments=1)``
    """
    from ..actors.unrolling_worker import UnrollingPool, UnrollingSpec
    from .workers import start_workers

    cfg = as_config(ApproxUnrollingRunConfig, cfg, **overrides)
    cfg = with_default_query(cfg, cfg.query_path)
    if not cfg.run.run_path:
        raise BadInputError("run_path is required")
    t0 = time.perf_counter()
    root = Path(os.path.abspath(os.path.expanduser(cfg.run.run_path)))  # workers may run elsewhere
    plan = plan_run(cfg, root)
    steps = Steps(root, cfg)
    _write_config(root, cfg)
    _export(plan, steps)
    if cfg.query_path:
        _check_query(Path(cfg.query_path), plan)

    pool_plan = start_workers(cfg.ray, faults=faults)  # one worker in process, or a Ray pool
    spec = UnrollingSpec(
        checkpoints=[str(p) for p in plan.hf_dirs], model=cfg.model, data=cfg.data,
        grad=cfg.grad, batch=cfg.batch, hessian=cfg.hessian, skip_short_docs=cfg.skip_short_docs,
        device=pool_plan.device, torch_threads=pool_plan.torch_threads,
        query_batch_size=cfg.query_batch_size, query=None if cfg.query_path else cfg.query,
    )  # fmt: skip
    chunks = _chunks(plan.num_docs, cfg.ray.window_size)
    pool = UnrollingPool(spec, pool_plan.size, num_cpus=pool_plan.num_cpus,
                         num_gpus=pool_plan.num_gpus, faults=faults,
                         local=pool_plan.in_process)  # fmt: skip
    try:
        qpath = _query(cfg, plan, steps, pool, len(plan.checkpoints) - 1)
        num_queries = _check_query(qpath, plan).num_grads
        _factor_pass(cfg, plan, steps, pool, chunks)
        _segments(cfg, plan, steps)
        _lambda_pass(cfg, plan, steps, pool, chunks)
        _segment_lambdas(cfg, plan, steps)
        grids = _preconditioners(cfg, plan, steps)
        _walk(cfg, plan, steps, qpath, grids)
        _score_pass(cfg, plan, steps, pool, chunks, num_queries)
        stats = pool.stats
    finally:
        pool.shutdown()
    out = _final_scores(cfg, plan, steps)
    record = {
        "checkpoints": [str(p) for p in plan.hf_dirs], "segments": len(plan.groups),
        "lr_times_steps": plan.lr_times_steps, "momentum": plan.momentum,
        "variant": "adam" if cfg.use_adam_preconditioner else "sgd",
        "documents": plan.num_docs, "queries": num_queries, "query_path": str(qpath),
        "workers": pool_plan.size, "jobs": stats.computed, "jobs_lost": stats.lost,
        "ran": steps.ran, "reused": steps.reused, "seconds": round(time.perf_counter() - t0, 3),
    }  # fmt: skip
    (root / SUMMARY).write_text(json.dumps(record, indent=2) + "\n")
    log.info("approxunrolling: done in %.1fs -> %s", time.perf_counter() - t0, out)
    return out


__all__ = ["approxunrolling", "plan_run"]
