"""``build``: a per-example gradient store of a dataset, computed on a Ray actor pool.

Data path::

    row indices (Ray Data) ──► GradientWorker pool (reads rows, tokenizes, packs by
    token budget, per-example gradients) ──► driver writes each row at its own index

Rows land at their dataset index, so the store never depends on scheduling order;
Ray Data re-runs the batches of a crashed worker, so each row is written once.
Everything goes to ``<run>.part`` and is renamed only when complete; ``--resume``
reopens the ``.part`` and computes only the rows its ``written`` bitmap lacks.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ..cli.args import from_dict
from ..config import BuildConfig
from ..errors import BadInputError
from ..gradients.runner import RunnerSpec
from .common import Layout, configure_data_context, plan_layout, run_workers, stream, worker_pool
from .storage import remote_output

log = logging.getLogger(__name__)
T = TypeVar("T")

PROGRESS_DIR = "progress"


def as_config(cls: type[T], cfg: T | dict | None = None, **overrides: Any) -> T:
    """Accept a config, a nested dict, or flat keyword overrides (``projection_dim=16``).

    Flat keys are looked up in each nested section, so the Python API takes the same
    names as the CLI flags: ``build(run_path=..., dataset="tiny", projection_dim=16)``.
    """
    if cfg is None:
        cfg = cls()
    elif isinstance(cfg, dict):
        cfg = from_dict(cls, cfg)
    cfg = dataclasses.replace(cfg)
    names = [f.name for f in dataclasses.fields(cfg)]
    for key, val in overrides.items():
        if key == "run_path":
            key, val = "run_path", str(val)
        for name in names:
            section = getattr(cfg, name)
            if dataclasses.is_dataclass(section) and key in {f.name for f in dataclasses.fields(section)}:
                setattr(cfg, name, dataclasses.replace(section, **{key: val}))
                break
        else:
            if key in names:
                setattr(cfg, key, val)
            else:
                raise BadInputError(f"unknown option {key!r} for {cls.__name__}")
    return cfg


def validate(cfg: BuildConfig) -> None:
    if not cfg.run.run_path:
        raise BadInputError("run_path is required")
    if cfg.grad.attribute_tokens and cfg.preprocess.aggregation != "none":
        raise BadInputError("attribute_tokens needs aggregation 'none'")
    if cfg.grad.projection_dim < 0:
        raise BadInputError("projection_dim must be >= 0")
    if cfg.batch.token_batch_size <= 1:
        raise BadInputError("token_batch_size must be > 1")


def runner_spec(cfg: BuildConfig, device: str, advantages: np.ndarray | None) -> RunnerSpec:
    return RunnerSpec(
        model=cfg.model,
        grad=cfg.grad,
        data=cfg.data,
        batch=cfg.batch,
        preprocess=cfg.preprocess,
        skip_short_docs=cfg.skip_short_docs,
        device=device,
        advantages=advantages,
    )


def open_dataset(cfg: BuildConfig):
    """The source dataset (memory-mapped), validated, plus GRPO advantages if asked for."""
    from ..data.loading import check_columns, load_dataset_rows, prompt_key
    from ..data.tokenize import estimate_advantages

    ds = load_dataset_rows(cfg.data)
    check_columns(ds.column_names, cfg.data)
    if len(ds) == 0:
        raise BadInputError(f"dataset {cfg.data.dataset!r} (split {cfg.data.split!r}) is empty")
    advantages = None
    if cfg.data.reward_column:
        conv = bool(cfg.data.conversation_column)
        col = cfg.data.conversation_column or cfg.data.prompt_column
        prompts = [prompt_key(v, conv) for v in ds[col]]
        advantages = estimate_advantages(
            prompts, list(ds[cfg.data.reward_column]), cfg.data.skip_nan_rewards
        ).astype(np.float32)
        if np.isnan(advantages).any():
            raise BadInputError(
                f"{int(np.isnan(advantages).sum())} rows have NaN rewards: drop them from the "
                "dataset first (bergson_ray keeps row indices stable, so it does not drop rows)"
            )
    return ds, advantages


def token_offsets(cfg: BuildConfig, ds) -> np.ndarray:
    """Per-token stores need every document's token count before any row is written."""
    from transformers import AutoConfig, AutoTokenizer

    from ..data.tokenize import tokenize_rows
    from ..gradients.model_loading import resolve_model_name

    name = resolve_model_name(cfg.model.tokenizer or cfg.model.model)
    tok = AutoTokenizer.from_pretrained(name, revision=cfg.model.revision)
    hf_cfg = AutoConfig.from_pretrained(resolve_model_name(cfg.model.model))
    limit = getattr(hf_cfg, "max_position_embeddings", None)
    if cfg.data.truncation:
        limit = min(limit or cfg.batch.token_batch_size, cfg.batch.token_batch_size)
    counts = np.zeros(len(ds), dtype=np.int64)
    step = 2048
    for lo in range(0, len(ds), step):
        docs = tokenize_rows(ds[lo : lo + step], tok, cfg.data, limit)
        counts[lo : lo + len(docs)] = [max(len(d.input_ids) - 1, 0) for d in docs]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


class Progress:
    """Per-document loss and length, memory-mapped in the ``.part`` dir (survives resume)."""

    def __init__(self, part: Path, n: int):
        d = part / PROGRESS_DIR
        d.mkdir(exist_ok=True)
        mode = "r+" if (d / "loss.npy").exists() else "w+"
        self.loss = np.lib.format.open_memmap(d / "loss.npy", mode, np.float32, (n,))
        self.length = np.lib.format.open_memmap(d / "length.npy", mode, np.int64, (n,))

    def update(self, out: dict[str, np.ndarray]) -> None:
        self.loss[out["idx"]] = out["loss"]
        self.length[out["idx"]] = out["length"]

    def flush(self) -> None:
        self.loss.flush()
        self.length.flush()


def as_rows(arr: np.ndarray, dtype: torch.dtype) -> np.ndarray | torch.Tensor:
    """Worker rows -> what the store writer takes (bf16 arrives as uint16 bit patterns)."""
    if dtype == torch.bfloat16 and arr.dtype == np.uint16:
        # Ray Data hands out read-only views; torch needs memory it may own
        return torch.from_numpy(np.array(arr, copy=True).view(np.int16)).view(torch.bfloat16)
    return arr


def stack_ragged(col: np.ndarray, dim: int) -> np.ndarray:
    parts = [np.asarray(x).reshape(-1, dim) for x in col]
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def write_data_hf(part: Path, ds, progress: Progress, drop_columns: bool) -> None:
    """``data.hf``: the dataset's rows (unless dropped) plus ``length`` and ``loss``."""
    import datasets

    if drop_columns:
        out = datasets.Dataset.from_dict({"length": progress.length[:], "loss": progress.loss[:]})
    else:
        out = ds
        for col in ("length", "loss"):
            if col in out.column_names:
                out = out.remove_columns(col)
        out = out.add_column("length", np.asarray(progress.length)).add_column(
            "loss", np.asarray(progress.loss)
        )
    out.save_to_disk(str(part / "data.hf"))


@remote_output(BuildConfig)  # s3:// / gs:// run paths: stage locally, upload when done
def build(cfg: BuildConfig | dict | None = None, *, _chaos: dict | None = None, **overrides) -> Path:
    """Build a per-example gradient store; returns the finished run directory.

    ``bergson_ray.build(run_path="runs/idx", projection_dim=16, dataset="tiny")``
    """

    from ..actors.gradient_worker import GradientWorker
    from ..store.gradient_store import GradientStoreWriter
    from ..store.processor import ProcessorConfig, save_processor, write_total_processed
    from ..store.run_dir import RunDir
    from ..utils.metrics import StageMonitor, dir_bytes
    from ..utils.ray_env import init_ray
    from .storage import cluster_probe

    cfg = as_config(BuildConfig, cfg, **overrides)
    validate(cfg)
    run = RunDir(cfg.run.run_path, overwrite=cfg.run.overwrite, resume=cfg.run.resume)
    part = Path(run.part)
    t0 = time.perf_counter()
    ds, advantages = open_dataset(cfg)
    layout: Layout = plan_layout(cfg.model, cfg.grad)
    n = len(ds)
    resuming = (part / "info.json").exists()
    if resuming:
        writer = GradientStoreWriter.reopen(part)
        if writer.grad_sizes != layout.grad_sizes or writer.num_items != n:
            raise BadInputError(
                f"--resume: {part} was started with other settings (modules or row count differ)"
            )
    else:
        offsets = token_offsets(cfg, ds) if cfg.grad.attribute_tokens else None
        writer = GradientStoreWriter(
            part,
            num_items=n,
            grad_sizes=layout.grad_sizes,
            dtype=layout.dtype,
            attribute_tokens=cfg.grad.attribute_tokens,
            offsets=offsets,
        )
        from ..config_io import build_step_body  # ours + bergson's index_cfg/preprocess_cfg

        run.write_config(build_step_body(cfg), command="build")
    todo = writer.missing_items()
    progress = Progress(part, n)
    log.info("build: %d documents (%d to do), %d columns per row", n, len(todo), layout.dim)

    monitor = StageMonitor("build", len(todo), n, run=run.final.name)
    if len(todo):
        init_ray(cfg.ray.address, namespace=cfg.ray.namespace)
        configure_data_context()
        probe = cluster_probe(part, cfg.data, cfg.model)  # fail fast: every node sees the run
        pool = worker_pool(cfg.ray)
        spec = runner_spec(cfg, pool.device, advantages)
        out_ds = run_workers(todo, GradientWorker, cfg.ray, pool, spec=spec, chaos=_chaos, probe=probe)
        for k, out in enumerate(stream(out_ds, len(todo), "build", monitor=monitor)):
            progress.update(out)  # first: a row marked written must have its loss/length
            if cfg.grad.attribute_tokens:
                rows = stack_ragged(out["grads"], layout.dim)
                writer.write_items(out["idx"], as_rows(rows, layout.dtype), out["token_count"])
            else:
                writer.write_rows(out["idx"], as_rows(out["grads"], layout.dtype))
            if k % 32 == 31:
                writer.flush()
                progress.flush()
    writer.flush()
    progress.flush()
    missing = writer.missing_items()
    if len(missing):
        raise RuntimeError(f"{len(missing)} rows were never written (e.g. {missing[:5]})")

    write_data_hf(part, ds, progress, cfg.drop_columns)
    save_processor(part, ProcessorConfig.from_gradient_config(cfg.grad))
    tokens = int(np.asarray(progress.length).sum())
    positions = int(np.maximum(np.asarray(progress.length) - 1, 0).sum())
    write_total_processed(part, positions)
    seconds = time.perf_counter() - t0
    run.write_summary(
        {
            "command": "build",
            "rows": int(writer.info.num_grads),
            "documents": n,
            "computed_documents": int(len(todo)),
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
            "bytes_written": int((part / "gradients.bin").stat().st_size),
            "run_bytes": dir_bytes(part),
            **monitor.summary(),
        }
    )
    writer.close()
    shutil.rmtree(part / "progress", ignore_errors=True)  # now in data.hf
    return Path(run.commit())
