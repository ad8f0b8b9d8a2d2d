"""Where gradient workers run on a multi-node cluster.

* :func:`map_workers` is the one place a pipeline turns its index dataset into a pool
  of BatchWorkers (``actors/batch_worker.py``): Ray Data creates pool
  actors with the ``SPREAD`` strategy (its default, ``DataContext.scheduling_strategy``),
  so they land on as many nodes as possible; ``--worker_resources`` / ``--worker_labels``
  pin them to node types (custom resources or node labels); ``--fsdp`` makes each
  worker lead a sharded group (``runners/sharded.py``) whose ranks a placement group
  keeps together.
* :func:`gpu_capacity` tells "no GPUs right now" apart from "no GPUs ever" on an
  autoscaling cluster.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import BadInputError
from ..utils.kv import parse_kv

log = logging.getLogger(__name__)

FSDP_LEADER_CPUS = 0.0
"""The leader of a sharded group only ships row ids and results; its ranks hold the CPUs/GPUs."""


def worker_resources(ray_cfg) -> dict[str, float]:
    res = parse_kv(getattr(ray_cfg, "worker_resources", ""), "--worker_resources", cast=float)
    for key in ("CPU", "GPU", "memory"):
        if key in res:
            raise BadInputError(
                f"--worker_resources {key}=...: use --cpus_per_worker / --num_gpus_per_worker"
            )
    return res


def worker_labels(ray_cfg) -> dict[str, str]:
    return parse_kv(getattr(ray_cfg, "worker_labels", ""), "--worker_labels", cast=str)


def gpu_capacity() -> tuple[int, int]:
    """``(GPUs now, GPUs the autoscaler could provide)`` (the second is 0 if unknown)."""
    import ray

    now = int(ray.cluster_resources().get("GPU", 0))
    possible = 0
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
        possible = int(min(limits.get("GPU", 0), 1 << 30))
    except Exception as err:  # noqa: BLE001 - private API, best effort
        log.debug("autoscaler limits unavailable: %s", err)
    return now, max(now, possible)


def map_workers(ds, spec, output, ray_cfg, pool, *, probe=None, faults=None):
    """``ds.map_batches(BatchWorker)`` with a pool placed for this cluster.

    ``spec`` is the :class:`~bergson_ray.runners.gradient_runner.RunnerSpec`, ``output``
    one of ``actors/batch_worker.py``'s outputs, ``pool`` the
    :class:`~bergson_ray.pipelines.workers.PoolPlan`, ``probe`` the storage probe every
    worker re-checks on its node (None skips it), ``faults`` a test-only
    :class:`~bergson_ray.testing.faults.FaultPlan`.
    """
    import ray

    from ..actors.batch_worker import BatchWorker
    from ..runners.gradient_runner import OneProcess

    resources = worker_resources(ray_cfg)
    labels = worker_labels(ray_cfg)
    num_cpus, num_gpus = pool.num_cpus, pool.num_gpus
    runner = OneProcess(pool.torch_threads)
    if ray_cfg.fsdp:
        from ..runners.sharded import group_plan

        runner = group_plan(ray_cfg, pool, resources, labels)
        num_cpus, num_gpus, resources, labels = FSDP_LEADER_CPUS, 0, {}, {}
    extra: dict[str, Any] = {}
    if resources:
        extra["resources"] = resources
    if labels:
        extra["label_selector"] = labels
    log.info(
        "worker pool: %d x %s (%s, cpus %.2f, gpus %.2f%s%s)",
        pool.size,
        type(output).__name__,
        type(runner).__name__,
        num_cpus,
        num_gpus,
        f", resources {resources}" if resources else "",
        f", labels {labels}" if labels else "",
    )
    kwargs = dict(spec=spec, output=output, runner=runner, probe=probe, faults=faults)
    return ds.map_batches(
        BatchWorker,
        fn_constructor_kwargs=kwargs,
        batch_size=ray_cfg.window_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.size),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        **extra,
    )


def driver_node_strategy():
    """Keep a stateful helper (e.g. the reducer) on the driver's node, which outlives
    worker nodes: losing it would lose its in-memory state."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
