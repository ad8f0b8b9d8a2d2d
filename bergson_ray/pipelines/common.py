"""Ray wiring shared by the build, reduce, score and Hessian pipelines.

* :func:`plan_layout` learns the store layout (module row widths, dtype) from the
  model *config* on the meta device, so the driver never loads weights.
* :func:`worker_pool` sizes the gradient-worker actor pool for the cluster.
* :func:`index_dataset` is the Ray Data source: just row indices. Workers read the
  rows themselves, so text never travels through the driver.
* :func:`stream` drives the pipeline with a progress bar and turns Ray's wrapped
  exceptions back into the user-facing error that caused them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..config import GradientConfig, ModelConfig, RayConfig
from ..errors import BadInputError, BergsonRayError, decode_error, unwrap

log = logging.getLogger(__name__)


@dataclass
class Layout:
    grad_sizes: dict[str, int]
    dtype: torch.dtype

    @property
    def dim(self) -> int:
        return sum(self.grad_sizes.values())


def plan_layout(model_cfg: ModelConfig, grad_cfg: GradientConfig) -> Layout:
    """Row layout of a store built with these settings, from the model config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..gradients.collector import PerExampleCollector
    from ..gradients.model_loading import DTYPES, resolve_model_name
    from ..gradients.modules import find_target_modules

    name = resolve_model_name(model_cfg.model)
    try:
        hf_cfg = AutoConfig.from_pretrained(name, revision=model_cfg.revision)
    except (OSError, ValueError) as err:
        raise BadInputError(f"could not load model config for {model_cfg.model!r}: {err}") from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    modules = find_target_modules(model, grad_cfg)
    sizes = PerExampleCollector(modules, grad_cfg).grad_sizes
    if model_cfg.precision == "auto":
        dtype = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None)
        dtype = getattr(torch, str(dtype).replace("torch.", "")) if dtype else torch.float32
    else:
        dtype = DTYPES[model_cfg.precision]
    return Layout(sizes, dtype)


@dataclass
class PoolPlan:
    size: int
    num_cpus: float
    num_gpus: float
    torch_threads: int
    device: str


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
    threads = ray_cfg.torch_threads or max(1, int(cpus // size))
    return PoolPlan(size, ray_cfg.cpus_per_worker, 0.0, threads, "cpu")


def index_dataset(indices: np.ndarray, window: int):
    """A Ray dataset of row indices (column ``idx``), cut into ~one window per block."""
    import ray

    n = len(indices)
    blocks = max(1, min(4096, math.ceil(n / max(1, window))))
    return ray.data.from_numpy(np.asarray(indices, dtype=np.int64)).repartition(blocks).map_batches(
        _rename_idx, batch_format="numpy", batch_size=None
    )


def run_workers(
    indices: np.ndarray, worker_cls: type, ray_cfg: RayConfig, pool: PoolPlan, *, probe=None, **kwargs
):
    """``index_dataset(indices)`` mapped through an actor pool of ``worker_cls``.

    ``kwargs`` go to the worker's constructor (alongside ``torch_threads``); the
    returned dataset is lazy: iterate it with :func:`stream`. Placement (spread over
    nodes, ``--worker_resources``/``--worker_labels``), ``--fsdp`` groups and the
    per-node storage check (``probe``) are in :func:`.placement.map_workers`.
    """
    from .placement import map_workers

    return map_workers(
        index_dataset(indices, ray_cfg.window_size),
        worker_cls,
        {**kwargs, "torch_threads": pool.torch_threads},
        ray_cfg,
        pool,
        probe=probe,
    )


def _rename_idx(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"idx": batch["data"]}


def configure_data_context() -> None:
    """Our tqdm bar replaces Ray Data's; keep the log readable."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


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
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
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
