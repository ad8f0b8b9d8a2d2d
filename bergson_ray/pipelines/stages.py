"""Stage helpers shared by the build, reduce, score and Hessian pipelines.

Planning (driver, before any worker starts):

* :func:`meta_model` / :func:`plan_layout` learn the store layout (module row widths,
  dtype) from the model *config* on the meta device, so the driver never loads weights.
* :func:`worker_pool` sizes the worker actor pool for the cluster.
* :func:`open_dataset` opens and checks the source dataset (plus GRPO advantages);
  :func:`token_offsets` counts tokens for per-token stores; :func:`runner_spec` is what
  every worker needs to rebuild the runner.

Running:

* :func:`index_dataset` is the Ray Data source: just row indices. Workers read the
  rows themselves, so text never travels through the driver.
* :func:`run_workers` maps it through the worker pool; :func:`stream` drives the
  pipeline with a progress bar and turns Ray's wrapped exceptions back into the
  user-facing error that caused them.

Writing (driver): :class:`Progress` (per-document loss and length, survives
``--resume``) and :func:`write_data_hf`; gradient rows are written by the workers
(``store/row_sink.py``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import BuildConfig, GradientConfig, ModelConfig, RayConfig
from ..data.row_plan import RowPlan
from ..errors import BadInputError, BergsonRayError, decode_error, load_error, unwrap
from ..runners.gradient_runner import RunnerSpec
from ..utils.dtypes import torch_dtype

log = logging.getLogger(__name__)

PROGRESS_DIR = "progress"


@dataclass
class Layout:
    grad_sizes: dict[str, int]
    dtype: torch.dtype

    @property
    def dim(self) -> int:
        return sum(self.grad_sizes.values())


def model_config(model_cfg: ModelConfig):
    """The model's HF config (no weights), or a clear error."""
    from transformers import AutoConfig

    from ..runners.model_loading import resolve_model_name

    name = resolve_model_name(model_cfg.model)
    try:
        return AutoConfig.from_pretrained(name, revision=model_cfg.revision)
    except Exception as err:  # noqa: BLE001 - transformers raises many types
        raise load_error("model", model_cfg.model, err) from None


def meta_model(model_cfg: ModelConfig, hf_cfg=None):
    """The model skeleton on the meta device: module names and shapes, no weights."""
    from transformers import AutoModelForCausalLM

    from ..runners.model_loading import with_adapter

    hf_cfg = hf_cfg if hf_cfg is not None else model_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    return with_adapter(model, model_cfg, meta=True)  # PEFT: the adapter's modules


def plan_layout(model_cfg: ModelConfig, grad_cfg: GradientConfig) -> Layout:
    """Row layout of a store built with these settings, from the model config alone."""
    from ..gradients.collector import PerExampleCollector
    from ..gradients.modules import find_target_modules, log_coverage

    hf_cfg = model_config(model_cfg)
    model = meta_model(model_cfg, hf_cfg)
    modules = find_target_modules(model, grad_cfg)
    log_coverage(model, modules, grad_cfg.include_bias)
    sizes = PerExampleCollector(modules, grad_cfg).grad_sizes
    if model_cfg.precision == "auto":
        dtype = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None)
        dtype = getattr(torch, str(dtype).replace("torch.", "")) if dtype else torch.float32
    else:
        dtype = torch_dtype(model_cfg.precision, "precision")
    return Layout(sizes, dtype)


@dataclass
class PoolPlan:
    size: int
    num_cpus: float
    num_gpus: float
    torch_threads: int
    device: str
    in_process: bool = False
    """One worker in the driver's process, no Ray (``pipelines/in_process.py``)."""


def worker_pool(ray_cfg: RayConfig) -> PoolPlan:
    """One worker per GPU (or ``num_gpus_per_worker`` GPUs each); else CPU workers.

    CPU workers reserve less than a whole logical CPU each so that Ray Data's own
    read tasks can always be scheduled (a pool holding every CPU deadlocks them),
    and set their torch thread count explicitly because Ray pins actors with
    ``num_cpus <= 1`` to one OpenMP thread.
    """
    from ..utils.ray_env import cluster_cpus
    from .placement import gpu_capacity

    gpus, possible = gpu_capacity()
    want = getattr(ray_cfg, "worker_device", "auto")
    if want == "cuda" or (want == "auto" and possible > 0):
        per = max(ray_cfg.num_gpus_per_worker, 1e-3)
        if gpus == 0 and not ray_cfg.num_workers:
            log.warning(
                "the cluster has no GPU right now (%s): starting 1 GPU worker, which waits for "
                "a GPU node; pass --num_workers N to request N",
                f"its autoscaler can add {possible}" if possible else "--worker_device cuda",
            )
        size = ray_cfg.num_workers or max(1, int(gpus // per))
        return PoolPlan(size, 1.0, per, ray_cfg.torch_threads, "cuda")
    if not ray_cfg.num_workers and (ray_cfg.address or os.environ.get("RAY_ADDRESS")):
        log.warning(
            "--num_workers 0 on a cluster without GPUs: starting 1 CPU worker. On an "
            "autoscaling cluster whose GPU nodes are scaled to zero, pass --num_workers N "
            "(and --worker_device cuda if Ray cannot see the autoscaler's GPU node types)"
        )
    size = ray_cfg.num_workers or 1
    cpus = cluster_cpus()
    fit = max(1, int(cpus // ray_cfg.cpus_per_worker))
    if size > fit:
        remote = bool(ray_cfg.address or os.environ.get("RAY_ADDRESS"))
        if not remote:  # a local Ray never grows: the extra workers would wait forever
            log.warning(
                "--num_workers %d x --cpus_per_worker %g needs %g CPUs but this Ray has %g: "
                "starting %d workers", size, ray_cfg.cpus_per_worker,
                size * ray_cfg.cpus_per_worker, cpus, fit,
            )
            size = fit
        else:
            log.warning(
                "--num_workers %d needs %g CPUs, the cluster has %g now: the rest wait for "
                "the autoscaler", size, size * ray_cfg.cpus_per_worker, cpus,
            )
    threads = ray_cfg.torch_threads or max(1, int(cpus // size))
    return PoolPlan(size, ray_cfg.cpus_per_worker, 0.0, threads, "cpu")


def index_dataset(indices: np.ndarray, window: int):
    """A Ray dataset of row indices (column ``idx``), one block per ~window.

    Built from in-memory Arrow tables, so the pipeline is just input -> worker pool: no
    read, repartition or rename tasks (each would start a Ray worker process, costing
    seconds and hundreds of MiB on a small machine).
    """
    import pyarrow as pa
    import ray

    return ray.data.from_arrow([pa.table({"idx": part}) for part in index_windows(indices, window)])


def index_windows(indices: np.ndarray, window: int) -> list[np.ndarray]:
    """``indices`` cut into at most ``window``-long, near-equal consecutive parts: the
    batches a worker sees (the Ray dataset's blocks, or the in-process worker's calls)."""
    idx = np.asarray(indices, dtype=np.int64)
    blocks = max(1, min(4096, math.ceil(len(idx) / max(1, window))))
    return np.array_split(idx, blocks)


def run_workers(
    indices: np.ndarray, spec, output, ray_cfg: RayConfig, pool: PoolPlan, *, probe=None, faults=None
):
    """``index_dataset(indices)`` mapped through a pool of BatchWorkers producing ``output``
    (``actors/batch_worker.py``: ``Rows``, ``PartialSums`` or ``Scores``).

    The returned dataset is lazy: iterate it with :func:`stream`. A ``pool`` planned
    ``in_process`` gives the same batches from one worker in this process. Placement (spread over
    nodes, ``--worker_resources``/``--worker_labels``), ``--fsdp`` groups and the
    per-node storage check (``probe``) are in :func:`.placement.map_workers`.
    """
    from .placement import map_workers

    if pool.in_process:
        from .in_process import in_process_batches

        windows = index_windows(indices, ray_cfg.window_size)
        return in_process_batches(windows, spec, output, pool.torch_threads)
    ds = index_dataset(indices, ray_cfg.window_size)
    return map_workers(ds, spec, output, ray_cfg, pool, probe=probe, faults=faults)


def start_workers(ray_cfg: RayConfig, monitor=None, faults=None) -> PoolPlan:
    """Plan the stage's worker pool, starting or joining Ray only when the pool needs it.

    One local worker runs in this process (``--executor auto|process``,
    ``pipelines/in_process.py``); otherwise Ray is started or joined (its seconds go
    to ``monitor``, a :class:`~bergson_ray.utils.metrics.StageMonitor`) and the pool
    is sized for the cluster.
    """
    from .in_process import local_device, runs_in_process

    if runs_in_process(ray_cfg, faults):
        log.info("one worker in this process (no Ray): --executor ray to use a Ray pool")
        device, threads = local_device(ray_cfg)
        pool = PoolPlan(1, 0.0, float(device == "cuda"), threads, device, in_process=True)
    else:
        from ..utils.ray_env import init_ray

        seconds = init_ray(ray_cfg.address, namespace=ray_cfg.namespace)
        if monitor is not None:
            monitor.ray_seconds = seconds
        configure_data_context()
        pool = worker_pool(ray_cfg)
    if monitor is not None:
        monitor.executor = "process" if pool.in_process else "ray"
    return pool


def configure_data_context() -> None:
    """Our tqdm bar replaces Ray Data's; keep the log readable."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # we turned them off on purpose: Ray Data's "progress bars disabled" notice is not news
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _is_batch_iterator(ds) -> bool:
    """``run_workers``' result is a plain iterator of batches (the in-process worker)."""
    return isinstance(ds, Iterator)


def stream(
    ds, total: int, desc: str, unit: str = "doc", monitor=None
) -> Iterator[dict[str, np.ndarray]]:
    """Iterate output batches with a progress bar; re-raise the user's error cleanly.

    ``monitor`` (a :class:`~bergson_ray.utils.metrics.StageMonitor`) sees every batch:
    rows/tokens per second on the bar and in Ray's metrics, duplicate-row accounting.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        batches = ds if _is_batch_iterator(ds) else ds.iter_batches(
            batch_size=None, batch_format="numpy", prefetch_batches=2
        )
        for batch in batches:
            if "error" in batch:
                raise decode_error(batch["error"][0])
            yield batch
            if monitor is not None:
                monitor.update(batch)
                bar.set_postfix(monitor.postfix(), refresh=False)
            bar.update(len(batch["idx"]))
    except Exception as exc:
        err = unwrap(exc)
        if isinstance(err, BergsonRayError):
            raise err from None
        raise
    finally:
        bar.close()
        log.info("%s: %d %ss in %.1fs", desc, bar.n, unit, time.perf_counter() - t0)


# ----------------------------------------------------------------- dataset side
def validate_build(cfg: BuildConfig) -> None:
    """The checks ``build`` and ``reduce`` share."""
    if not cfg.run.run_path:
        raise BadInputError("run_path is required")
    if cfg.grad.attribute_tokens and cfg.preprocess.aggregation != "none":
        raise BadInputError("attribute_tokens needs aggregation 'none'")
    if cfg.grad.projection_dim < 0:
        raise BadInputError("projection_dim must be >= 0")
    if cfg.batch.token_batch_size <= 1:
        raise BadInputError("token_batch_size must be > 1")


def runner_spec(
    cfg: BuildConfig, device: str, advantages: np.ndarray | None, rows: RowPlan | None = None
) -> RunnerSpec:
    return RunnerSpec(
        model=cfg.model,
        grad=cfg.grad,
        data=cfg.data,
        batch=cfg.batch,
        preprocess=cfg.preprocess,
        skip_short_docs=cfg.skip_short_docs,
        device=device,
        advantages=advantages,
        rows=rows,
    )


def open_dataset(cfg: BuildConfig):
    """The source dataset (memory-mapped), validated, plus GRPO advantages if asked for."""
    from ..data.loading import check_columns, load_dataset_rows, prompt_key
    from ..data.tokenize import estimate_advantages

    ds = load_dataset_rows(cfg.data, planned=True)  # the caller applies plan_rows
    check_columns(ds.column_names, cfg.data)
    if len(ds) == 0:
        raise BadInputError(f"dataset {cfg.data.dataset!r} (split {cfg.data.split!r}) is empty")
    advantages = None
    if cfg.data.advantage_column:  # precomputed: weights the loss like reward-derived ones
        from ..data.loading import column_advantages

        advantages = column_advantages(ds, cfg.data)
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


def driver_tokenizer(cfg) -> tuple[object, int | None]:
    """``(tokenizer, max_length)`` as the workers will have them, without the weights:
    ``max_length`` is the model's context (and the token budget with --truncation)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from ..runners.model_loading import max_model_length, resolve_model_name

    name = resolve_model_name(cfg.model.tokenizer or cfg.model.model)
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.model.revision)
    except Exception as err:  # noqa: BLE001 - transformers raises many types
        raise load_error("tokenizer", name, err) from None
    limit = max_model_length(SimpleNamespace(config=model_config(cfg.model)), tok)
    if cfg.data.truncation:
        budget = cfg.batch.token_batch_size
        limit = min(limit, budget) if limit else budget
    return tok, limit


def plan_rows(cfg, ds) -> RowPlan | None:
    """``--chunk_length`` / ``--max_tokens``: how store rows map onto ``ds`` (None: one to
    one). Tokenizes the dataset once on the driver; see ``data/row_plan.py``."""
    from ..data.row_plan import plan_rows as make_plan

    if not (cfg.data.chunk_length or cfg.data.max_tokens is not None):
        return None
    tok, limit = driver_tokenizer(cfg)
    return make_plan(ds, cfg.data, tok, limit)


def token_offsets(cfg: BuildConfig, ds, rows: RowPlan | None = None) -> np.ndarray:
    """Per-token stores need every document's token count before any row is written."""
    from transformers import AutoConfig, AutoTokenizer

    from ..data.tokenize import tokenize_rows
    from ..runners.model_loading import resolve_model_name

    if rows is not None and rows.chunks is not None:  # every chunk: L - 1 positions
        per = rows.chunks.chunk_length - 1
        return (np.arange(len(rows) + 1, dtype=np.int64) * per).astype(np.int64)

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
    if rows is not None:  # --max_tokens: the store's rows, repeats included
        counts = counts[rows.source]
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


def write_data_hf(
    part: Path, ds, progress: Progress, drop_columns: bool, rows: RowPlan | None = None
) -> None:
    """``data.hf``: the dataset's rows (unless dropped) plus ``length`` and ``loss``.

    With a row plan: ``--max_tokens`` rows are the dataset's rows in store order;
    ``--chunk_length`` rows are chunks, written as bergson does (``doc_ids``, ``length``,
    ``loss``; ``doc_ids[k][t]`` is the dataset row token ``t`` of chunk ``k`` came from).
    """
    import datasets

    if rows is not None and rows.chunks is not None:
        from ..data.row_plan import chunk_table

        chunk_table(rows.chunks, progress.length[:], progress.loss[:]).save_to_disk(
            str(part / "data.hf")
        )
        return
    if rows is not None:
        ds = rows.view(ds)
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


def open_training_run(cfg, command: str):
    """``(run_dir, model, tokenizer, tokenized_data)`` for a command that trains in this
    process (``train``, ``metasmoothness``): the run dir is refused early if it exists,
    the data is tokenized once, and the config is recorded before any training."""
    from ..store.run_dir import RunDir
    from ..training.data import load_tokenized
    from ..training.model import make_model, max_model_length

    if not cfg.run.run_path:
        raise BadInputError(f"{command} needs a run path")
    run = RunDir(cfg.run.run_path, overwrite=cfg.run.overwrite)
    model, tokenizer = make_model(cfg.model)
    data = load_tokenized(cfg.data, tokenizer, max_length=max_model_length(model, tokenizer))
    run.write_config(cfg, command=command)
    return run, model, tokenizer, data

