"""End the local Ray a driver started when that driver dies without ``ray.shutdown()``.

A driver killed with SIGKILL (an OOM kill, ``kill -9``, a lost terminal) cannot run
Ray's ``atexit`` clean-up, and the GCS server, raylet, dashboard and idle workers it
started linger for half a minute or more. :func:`watch` starts a small detached process
that polls the driver; when the driver is gone it ends exactly the processes that
driver's Ray started (identified by pid *and* creation time, so a recycled pid is never
touched) together with their descendants (the workers the raylet forked).

Only processes of a Ray this driver started are listed: joining a running cluster
hands nothing to the reaper.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)

POLL_S = 0.5
GRACE_S = 2.0
"""After the driver is gone: how long Ray's own shutdown gets before we step in."""
TERM_WAIT_S = 3.0


def started_ray_processes() -> list[tuple[int, float]]:
    """``(pid, create_time)`` of the processes the local Ray of this driver started."""
    import psutil
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # private API: guarded
    if node is None:
        return []
    out = []
    for infos in getattr(node, "all_processes", {}).values():
        for info in infos:
            proc = getattr(info, "process", None)
            if proc is None or proc.poll() is not None:
                continue
            try:
                out.append((proc.pid, psutil.Process(proc.pid).create_time()))
            except psutil.Error:
                continue
    return out


def watch(processes: list[tuple[int, float]] | None = None) -> int | None:
    """Start the reaper for this driver; returns its pid (None when there is nothing to do)."""
    try:
        processes = started_ray_processes() if processes is None else processes
    except Exception:  # noqa: BLE001 - private Ray API or psutil missing: never fail a run
        log.debug("cannot list the local Ray's processes; no reaper", exc_info=True)
        return None
    if not processes:
        return None
    spec = json.dumps({"driver": os.getpid(), "processes": processes})
    child = subprocess.Popen(
        [sys.executable, "-m", "bergson_ray.utils.ray_reaper", spec],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C in the terminal goes to the driver, not here
        close_fds=True,
    )  # fmt: skip
    return child.pid


def _same_process(pid: int, created: float):
    """The live ``psutil.Process`` for ``pid`` if it is still the one we were told of."""
    import psutil

    try:
        p = psutil.Process(pid)
        return p if abs(p.create_time() - created) < 1e-3 else None
    except psutil.Error:
        return None


def reap(driver: int, processes: list[tuple[int, float]]) -> None:
    """Wait for ``driver`` to end, then end ``processes`` and their descendants.

    The descendants are recorded while the driver lives: once it dies the GCS and the
    raylet may exit on their own, and the agents and workers they started are then
    re-parented to init, out of reach of a late ``children()`` call. Every psutil call
    tolerates a process vanishing under it: the driver (or a victim) can be reaped by its
    parent between any two calls, and the reaper must still end the rest."""
    import psutil

    roots = [p for p in (_same_process(pid, t) for pid, t in processes) if p is not None]
    known: dict[int, psutil.Process] = {p.pid: p for p in roots}
    driver_proc = _process(driver)
    while driver_proc is not None and _running(driver_proc):
        _record_descendants(roots, known)
        time.sleep(POLL_S)
    _record_descendants(roots, known)
    time.sleep(GRACE_S)
    _record_descendants(roots, known)  # what a still-running raylet started meanwhile
    victims = [p for p in known.values() if _running(p)]  # is_running checks the pid's age
    for p in victims:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(victims, timeout=TERM_WAIT_S)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _process(pid: int):
    """``psutil.Process(pid)``, or None when it is already gone."""
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _running(p) -> bool:
    """Alive and not a zombie; False when the pid is gone or now names another process."""
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _record_descendants(roots: list, known: dict) -> None:
    """Add every live descendant of the (still identical) roots to ``known``.

    One pass over the process table per call, whatever the number of roots (psutil's
    ``children(recursive=True)`` rescans it for each root)."""
    import psutil

    children: dict[int, list] = {}
    for p in psutil.process_iter(["ppid"]):
        children.setdefault(p.info["ppid"], []).append(p)
    stack = [r.pid for r in roots if _running(r)]
    seen = set(stack)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child.pid not in seen:
                seen.add(child.pid)
                known.setdefault(child.pid, child)
                stack.append(child.pid)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = json.loads(argv[0])
    try:
        reap(int(spec["driver"]), [(int(p), float(t)) for p, t in spec["processes"]])
    except Exception:  # noqa: BLE001 - nothing to report to: the driver is gone
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
