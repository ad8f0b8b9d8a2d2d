"""One worker in the driver's own process: a command's workers without Ray.

A run on one machine with one worker gains nothing from Ray but pays for it: a local
Ray's start (about 6 s), an actor process that imports torch and transformers again,
Ray Data's helper actors and about 1.5 GiB of Ray's own processes. Here the stage's
:class:`~bergson_ray.actors.batch_worker.BatchWorker` (the same class, the same runner,
the same outputs) is built in this process and fed the same windows of row indices a
one-worker Ray pool would see, in the same order: a build store is the same bytes, and
scores and sums agree to the last bits (Ray Data may re-cut the windows it batches).

``--executor auto`` (the default) takes this path only when the run would otherwise
start its own local Ray for a single worker: no ``--address``/``RAY_ADDRESS``, no Ray
already connected in this process, no live ``ray start`` head on this machine, at most
one GPU, no ``--fsdp``, and no worker resources or labels. Anything else runs on Ray
as before, and so does every run given a test fault plan (it kills Ray workers).

The same decision serves ``hessian`` (``sharded_fit.py``: worker and shards as plain
objects) and the job pools of ``magic``/``validate``/``lissa``/``approxunrolling``
(``actors/job_pool.py``, ``local=True``), both through ``actors/local_handles.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np

from ..config import RayConfig
from ..utils.ray_env import ray_running


def runs_in_process(ray_cfg: RayConfig, faults=None) -> bool:
    """Whether this stage computes in the driver's process (see the module docstring)."""
    if faults is not None:  # a test's fault plan kills and hides Ray workers
        return False
    if ray_cfg.executor != "auto":
        return ray_cfg.executor == "process"
    if ray_cfg.fsdp or ray_cfg.num_workers > 1:
        return False
    if ray_cfg.worker_resources or ray_cfg.worker_labels:
        return False
    if ray_cfg.address or os.environ.get("RAY_ADDRESS", "").strip():
        return False
    if ray_running():
        return False
    if _local_gpus() > 1:
        return False
    return not _live_local_head()


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _live_local_head() -> bool:
    """A ``ray start`` head this machine recorded that still answers (the user keeps Ray
    up between commands, so the command joins it)."""
    from ..utils.ray_env import head_answers, recorded_local_head

    recorded = recorded_local_head()
    return recorded is not None and head_answers(recorded)


def local_device(ray_cfg: RayConfig) -> tuple[str, int]:
    """``(device, torch threads)`` of the one local worker: this machine's GPU if it has
    one (and the run allows it), else its CPU with every core this process may use (or
    ``--torch_threads``)."""
    cuda = ray_cfg.worker_device != "cpu" and _local_gpus() > 0
    if ray_cfg.worker_device == "cuda" and not cuda:
        from ..errors import BadInputError

        raise BadInputError("--worker_device cuda, but this machine has no GPU torch can use")
    threads = ray_cfg.torch_threads or len(os.sched_getaffinity(0))
    return ("cuda" if cuda else "cpu"), threads


def in_process_batches(
    windows: Iterable[np.ndarray], spec, output, torch_threads: int
) -> Iterator[dict[str, np.ndarray]]:
    """The output batches of one :class:`BatchWorker` in this process, one per window of
    row indices (the blocks a one-worker Ray pool would get, in order).

    The torch thread count is set for the stage and restored after it (a Python caller's
    own setting survives the run).
    """
    import torch

    from ..actors.batch_worker import BatchWorker
    from ..runners.gradient_runner import OneProcess

    before = torch.get_num_threads()
    try:
        worker = BatchWorker(spec=spec, output=output, runner=OneProcess(torch_threads))
        for part in windows:
            yield worker({"idx": part})
    finally:
        torch.set_num_threads(before)
