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
import sys
import tempfile
from collections.abc import Mapping

log = logging.getLogger(__name__)

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind to 127.0.0.1 only
    "RAY_AUTH_MODE": "disabled",  # explicit: Ray's default depends on machine state
    "RAY_USAGE_STATS_ENABLED": "0",
}
"""The environment of a private, loopback-only Ray (no token auth, no usage stats)."""

LOCAL_DEFAULTS = {**LOOPBACK_ENV, "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "600"}


def ray_running() -> bool:
    """Whether this process is connected to Ray, asked without importing Ray: an
    in-process run never imports it (the import costs ~0.4 s and slows the exit)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def node_id() -> str:
    """This process's Ray node id, or ``"local"`` in a run without Ray."""
    if not ray_running():
        return "local"
    import ray

    return ray.get_runtime_context().get_node_id()


def loopback_env(env: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """A copy of ``env`` (default: this process's environment) for a child process that
    starts or joins a loopback Ray: :data:`LOOPBACK_ENV` where unset, then ``overrides``."""
    out = dict(os.environ if env is None else env)
    for key, val in LOOPBACK_ENV.items():
        out.setdefault(key, val)
    out.update(overrides)
    return out


def set_loopback_env(**extra: str) -> None:
    """Set :data:`LOOPBACK_ENV` (and ``extra``) in ``os.environ`` where unset; call it
    before ``import ray`` in scripts that start their own local Ray."""
    for key, val in {**LOOPBACK_ENV, **extra}.items():
        os.environ.setdefault(key, val)


def init_ray(address: str | None = None, *, namespace: str = "bergson_ray", **kwargs) -> float:
    """Idempotent ``ray.init``: reuse a running connection, else connect or start one.

    Returns the seconds it took (0 when already connected), for the start-up breakdown
    in ``summary.json``.
    """
    import time

    import ray

    if ray.is_initialized():
        return 0.0
    t0 = time.perf_counter()
    if not os.environ.get("RAY_ADDRESS", "x").strip():
        os.environ.pop("RAY_ADDRESS")  # set but empty means unset (Ray itself would choke on it)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
    if not address:
        set_loopback_env(**LOCAL_DEFAULTS)
        kwargs.setdefault("include_dashboard", False)
        if stale_local_head() is not None:
            address = "local"  # start our own instead of retrying a dead head for minutes
    log.info("ray.init(address=%s)", address or "<local>")
    # Ray's driver-side INFO lines ("Started a local Ray instance.") only at DEBUG
    kwargs.setdefault(
        "logging_level", logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING
    )
    ray.init(address=address, namespace=namespace, log_to_driver=True, **kwargs)
    if address in (None, "local"):
        from .ray_reaper import watch

        watch()  # a SIGKILLed driver must not leave the Ray it started running
    return time.perf_counter() - t0


def recorded_local_head() -> str | None:
    """The address of the ``ray start`` head named in Ray's temp dir
    (``ray_current_cluster``), alive or not; None when none is recorded.

    Read here rather than through ``ray._private``: asking must not import Ray, or every
    in-process command would pay for it. The directory follows Ray's rule
    (``RAY_TMPDIR``, else ``TMPDIR`` on Linux, else ``/tmp``, then ``ray/``).
    """
    if "RAY_TMPDIR" in os.environ:
        tmp = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        tmp = os.environ["TMPDIR"]
    else:
        tmp = "/tmp" if sys.platform.startswith(("linux", "darwin")) else tempfile.gettempdir()
    try:
        with open(os.path.join(tmp, "ray", "ray_current_cluster")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def head_answers(address: str) -> bool:
    """Whether something listens at a recorded head's ``host:port`` within a second."""
    from ..errors import BadInputError

    try:
        check_reachable(address, timeout_s=1.0)
    except BadInputError:
        return False
    return True


def stale_local_head() -> str | None:
    """The address of a ``ray start`` head this machine recorded that no longer answers.

    Without an address ``ray.init`` joins the head named in Ray's temp dir
    (``ray_current_cluster``); when that head has crashed, it retries for minutes and
    ignores Ctrl-C. A head that answers is joined as before (reusing a running Ray saves
    its start-up); a dead one is reported and a fresh local Ray is started instead.
    """
    recorded = recorded_local_head()
    if not recorded or head_answers(recorded):
        return None
    log.warning(
        "the Ray head recorded at %s is gone; starting a fresh local Ray (`ray stop` "
        "removes the leftovers of the dead one)",
        recorded,
    )
    return recorded


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Fail within seconds if nothing listens at a ``host:port`` GCS address.

    ``ray.init`` retries a dead address for minutes (and ignores Ctrl-C meanwhile); a
    TCP connect answers at once. ``auto``, ``local`` and ``ray://`` addresses are left
    to Ray.
    """
    import socket

    from ..errors import BadInputError

    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return
    except ValueError:
        raise BadInputError(f"Ray address {address!r} is not host:port") from None
    except OSError as err:
        raise BadInputError(
            f"no Ray cluster answers at {address} ({err.strerror or err}); start one with "
            "`ray start --head`, or leave --address and RAY_ADDRESS unset for a local Ray"
        ) from None


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))
