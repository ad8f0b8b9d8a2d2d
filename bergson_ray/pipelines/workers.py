"""A stage's workers: plan the pool, start it (Ray, or one worker in this process), feed
it row indices and drive its output batches.

* :func:`start_workers` plans the pool (:func:`worker_pool` on Ray, one worker in this
  process otherwise, ``in_process.py``) and starts or joins Ray only for a Ray pool.
* :func:`run_workers` feeds it row indices (:func:`index_dataset`, the Ray Data source:
  workers read the rows themselves, so text never travels through the driver) and
  :func:`stream` drives the output with a progress bar, turning Ray's wrapped
  exceptions back into the user-facing error that caused them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from ..config import RayConfig
from ..errors import BergsonRayError, decode_error, unwrap

log = logging.getLogger(__name__)

MAX_BLOCKS = 4096
"""Blocks of the index dataset at most (Ray's per-block overhead on huge corpora)."""


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
    """A Ray dataset of row indices (column ``idx``) whose blocks are whole windows of
    :func:`index_windows` (one per block, or several once there would be more than 4096
    blocks), so ``map_batches(batch_size=window)`` hands the workers exactly those
    windows: the same batches as a worker in the driver's process.

    Built from in-memory Arrow tables with ``ray.data.from_blocks``, which reads each
    block's metadata here, so the pipeline is just input -> worker pool: no read,
    repartition, rename or metadata tasks. ``from_arrow`` runs one metadata task per
    block; those tasks made Ray start two worker processes that then sat idle for the
    whole run (about 1 CPU-second each at start-up and 220 MiB each on the tiny default).
    """
    import pyarrow as pa
    import ray

    windows = index_windows(indices, window) or [np.zeros(0, dtype=np.int64)]
    per_block = _windows_per_block(len(windows))
    blocks = [np.concatenate(windows[k : k + per_block]) for k in range(0, len(windows), per_block)]
    tables = [pa.table({"idx": part}) for part in blocks]
    from_blocks = getattr(ray.data, "from_blocks", None)  # a DeveloperAPI; older Rays lack it
    return from_blocks(tables) if from_blocks is not None else ray.data.from_arrow(tables)


def _windows_per_block(windows: int) -> int:
    return max(1, math.ceil(windows / MAX_BLOCKS))


def index_blocks(rows: int, window: int) -> int:
    """How many blocks :func:`index_dataset` makes of ``rows`` row indices: the most
    workers that can get work at once (each block goes to one worker)."""
    windows = max(1, math.ceil(rows / max(1, window)))
    return math.ceil(windows / _windows_per_block(windows))


def index_windows(indices: np.ndarray, window: int) -> list[np.ndarray]:
    """``indices`` in consecutive ``window``-long parts (the last one shorter): the windows
    a worker sees. A Ray pool's ``map_batches(batch_size=window)`` cuts the same ones, so
    a window's documents share their padded batches wherever it runs."""
    idx = np.asarray(indices, dtype=np.int64)
    step = max(1, window)
    return [idx[lo : lo + step] for lo in range(0, len(idx), step)]


def run_workers(
    indices: np.ndarray, spec, output, ray_cfg: RayConfig, pool: PoolPlan, *, probe=None, faults=None
):
    """``index_dataset(indices)`` mapped through a pool of BatchWorkers producing ``output``
    (``actors/batch_worker.py``: ``Rows``, ``PartialSums`` or ``Scores``).

    Returns the lazy iterator of output batches: drive it with :func:`stream`. A
    ``pool`` planned ``in_process`` gives the same batches from one worker in this
    process. Placement (spread over
    nodes, ``--worker_resources``/``--worker_labels``), ``--fsdp`` groups and the
    per-node storage check (``probe``) are in :func:`.placement.map_workers`.
    """
    from .placement import map_workers

    if pool.in_process:
        from .in_process import in_process_batches

        windows = index_windows(indices, ray_cfg.window_size)
        return in_process_batches(windows, spec, output, pool.torch_threads)
    blocks = index_blocks(len(indices), ray_cfg.window_size)
    if pool.size > blocks:  # the rest would load the model and never get a window
        log.info("%d window(s) of rows: starting %d of %d workers", blocks, blocks, pool.size)
        pool = replace(pool, size=blocks)
    ds = index_dataset(indices, ray_cfg.window_size)
    ds = map_workers(ds, spec, output, ray_cfg, pool, probe=probe, faults=faults)
    return ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)


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


def stream(
    batches: Iterator[dict[str, np.ndarray]], total: int, desc: str, unit: str = "doc", monitor=None
) -> Iterator[dict[str, np.ndarray]]:
    """Iterate output batches with a progress bar; re-raise the user's error cleanly.

    ``monitor`` (a :class:`~bergson_ray.utils.metrics.StageMonitor`) sees every batch:
    rows/tokens per second on the bar and in Ray's metrics, duplicate-row accounting.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
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
