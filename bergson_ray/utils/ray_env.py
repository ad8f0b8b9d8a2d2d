"""Connect to Ray (or start a local one) with defaults that are safe on any machine.

* An explicit address, or ``RAY_ADDRESS`` (set by ``ray job submit``), connects to
  that cluster; otherwise a local Ray is started.
* A local Ray binds to loopback only and uses no token auth unless the user set
  ``RAY_AUTH_MODE``: Ray's behaviour otherwise depends on files left by earlier
  runs (see ``ray-on-2-cores.md``).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LOCAL_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "600",
}


def init_ray(address: str | None = None, *, namespace: str = "bergson_ray", **kwargs) -> None:
    """Idempotent ``ray.init``: reuse a running connection, else connect or start one."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        for key, val in LOCAL_DEFAULTS.items():
            os.environ.setdefault(key, val)
        kwargs.setdefault("include_dashboard", False)
    log.info("ray.init(address=%s)", address or "<local>")
    ray.init(address=address, namespace=namespace, log_to_driver=True, **kwargs)


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))
