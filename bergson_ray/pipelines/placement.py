"""Where gradient workers run on a multi-node cluster, and what they report back.

* :func:`map_workers` is the one place a pipeline turns its index dataset into a pool
  of workers: Ray Data creates pool actors with the ``SPREAD`` strategy (its default,
  ``DataContext.scheduling_strategy``), so they land on as many nodes as possible;
  ``--worker_resources`` / ``--worker_labels`` pin them to node types (custom
  resources or node labels); ``--fsdp`` swaps each worker for a sharded group
  (``actors/fsdp_worker.py``) whose ranks a placement group keeps together.
* :func:`instrumented` wraps the worker class so each worker re-checks, on its own
  node, that it sees the run directory (autoscaled nodes join after the driver's
  up-front check), turns start-up errors into the ``error`` column the driver
  re-raises, and tags each output row with its node id (``rows_per_node`` in the
  summary, and the proof that work really was spread).
* :func:`gpu_capacity` tells "no GPUs right now" apart from "no GPUs ever" on an
  autoscaling cluster.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import BadInputError, BergsonRayError, encode_error

log = logging.getLogger(__name__)

FSDP_LEADER_CPUS = 0.0
"""The leader of a sharded group only ships row ids and results; its ranks hold the CPUs/GPUs."""


def parse_kv(text: str, what: str, cast=float) -> dict[str, Any]:
    """``"a=1,b=0.5"`` -> ``{"a": 1.0, "b": 0.5}``."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"--{what}: expected name=value pairs, got {part!r}")
        try:
            out[key.strip()] = cast(val.strip())
        except ValueError as err:
            raise BadInputError(f"--{what}: bad value in {part!r}: {err}") from err
    return out


def worker_resources(ray_cfg) -> dict[str, float]:
    res = parse_kv(getattr(ray_cfg, "worker_resources", ""), "worker_resources")
    for key in ("CPU", "GPU", "memory"):
        if key in res:
            raise BadInputError(
                f"--worker_resources {key}=...: use --cpus_per_worker / --num_gpus_per_worker"
            )
    return res


def worker_labels(ray_cfg) -> dict[str, str]:
    return parse_kv(getattr(ray_cfg, "worker_labels", ""), "worker_labels", cast=str)


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


def map_workers(ds, worker_cls: type, ctor_kwargs: dict, ray_cfg, pool, *, probe=None):
    """``ds.map_batches`` with a pool of ``worker_cls`` placed for this cluster.

    ``pool`` is the :class:`~bergson_ray.pipelines.common.PoolPlan`; ``probe`` the
    storage probe every worker re-checks on its node (None skips it).
    """
    import ray

    resources = worker_resources(ray_cfg)
    labels = worker_labels(ray_cfg)
    kwargs = dict(ctor_kwargs)
    num_cpus, num_gpus = pool.num_cpus, pool.num_gpus
    if ray_cfg.fsdp:
        from ..actors.fsdp_worker import group_plan, sharded_class

        kwargs["group"] = group_plan(ray_cfg, pool, resources, labels)
        worker_cls = sharded_class(worker_cls)
        num_cpus, num_gpus, resources, labels = FSDP_LEADER_CPUS, 0, {}, {}
    kwargs["_probe"] = probe
    extra: dict[str, Any] = {}
    if resources:
        extra["resources"] = resources
    if labels:
        extra["label_selector"] = labels
    log.info(
        "worker pool: %d x %s (cpus %.2f, gpus %.2f%s%s)",
        pool.size,
        worker_cls.__name__,
        num_cpus,
        num_gpus,
        f", resources {resources}" if resources else "",
        f", labels {labels}" if labels else "",
    )
    return ds.map_batches(
        instrumented(worker_cls),
        fn_constructor_kwargs=kwargs,
        batch_size=ray_cfg.window_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.size),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        **extra,
    )


_WRAPPED: dict[type, type] = {}


def instrumented(cls: type) -> type:
    """Subclass of a worker UDF adding the node check, start-up error capture and a
    ``node`` column (same class name, so Ray's actor names stay readable)."""
    if cls in _WRAPPED:
        return _WRAPPED[cls]

    def __init__(self, *args, _probe=None, **kwargs):
        import ray

        self._node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        self._init_error = None
        self._trace = dict(kwargs.get("chaos") or {})
        self._batches = 0
        try:
            from .storage import verify_probe

            verify_probe(_probe)
            cls.__init__(self, *args, **kwargs)
        except BergsonRayError as err:
            # Raised from __init__, Ray reports only "actor died in its creation task";
            # as an error column the driver re-raises the user's own message.
            log.error("worker start-up failed: %s", err)
            self._init_error = encode_error(err)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        idx = np.asarray(batch["idx"])
        if self._init_error is not None:
            return {"idx": idx, "error": np.array([self._init_error] * len(idx))}
        out = cls.__call__(self, batch)
        out["node"] = np.full(len(out["idx"]), self._node)
        self._batches += 1
        _trace(self._trace, self._node, self._batches)
        return out

    wrapped = type(cls.__name__, (cls,), {"__init__": __init__, "__call__": __call__})
    wrapped.__qualname__ = cls.__qualname__
    wrapped.__doc__ = cls.__doc__
    _WRAPPED[cls] = wrapped
    return wrapped


def driver_node_strategy():
    """Keep a stateful helper (e.g. the reducer) on the driver's node, which outlives
    worker nodes: losing it would lose its in-memory state."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)


def _trace(chaos: dict, node: str, batches: int) -> None:
    """Test hooks in ``_chaos``: ``delay_s`` slows every batch down (so a test can act
    mid-run); ``trace_dir`` gets one file per finished batch, named after the node."""
    import os
    import time

    if chaos.get("delay_s"):
        time.sleep(float(chaos["delay_s"]))
    if chaos.get("trace_dir"):
        path = os.path.join(chaos["trace_dir"], f"{node}.{os.getpid()}.{batches}")
        open(path, "w").close()
