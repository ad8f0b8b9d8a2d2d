"""A private, loopback-only Ray head for tests and benchmarks.

``ray start --head --block`` in its own process group, temp dir and free ports, so it
never meets another Ray on the machine. It is stopped by ending exactly the processes it
started: ``ray stop`` would end every Ray on the machine, a user's included
(:func:`end_process_group`, which tests use for other process trees too).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from ..utils.net import free_port
from ..utils.ray_env import loopback_env

BIN = Path(sys.executable).parent


class LocalHead:
    """Start a head; ``address`` is what ``ray.init``/``RAY_ADDRESS`` take, ``url`` the
    dashboard (with ``dashboard=True``, for ``ray job submit``). A context manager.

    ``env`` is the head's environment (default: this process's, loopback-only, without
    ``RAY_ADDRESS``); its Ray workers inherit it.
    """

    def __init__(
        self,
        *,
        num_cpus: int = 2,
        dashboard: bool = False,
        object_store_bytes: int | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 180,
    ) -> None:
        # a short path: Ray's unix sockets live under it (108-byte limit)
        self.tmp = Path(tempfile.mkdtemp(prefix="brh-", dir="/tmp"))
        self.env = dict(env) if env is not None else loopback_env()
        self.env.pop("RAY_ADDRESS", None)
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.url: str | None = None
        args = [
            "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
            "--node-ip-address=127.0.0.1", f"--temp-dir={self.tmp}", "--disable-usage-stats",
            f"--ray-client-server-port={free_port()}",
        ]  # fmt: skip
        if object_store_bytes:
            args.append(f"--object-store-memory={object_store_bytes}")
        if dashboard:
            self.dashboard_port, self.metrics_port = free_port(), free_port()
            self.url = f"http://127.0.0.1:{self.dashboard_port}"
            args += [
                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--metrics-export-port={self.metrics_port}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
            ]  # fmt: skip
        else:
            args.append("--include-dashboard=false")
        self.log_path = self.tmp / "ray-start.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", *args],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        """Until the head answers: its dashboard's HTTP API, or else a driver that joins."""
        probe = f"import ray; ray.init(address={self.address!r}); ray.shutdown()"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {self.log_path.read_text()[-3000:]}")
            if self.url:
                try:
                    urllib.request.urlopen(f"{self.url}/api/version", timeout=2).read()
                    return
                except OSError:
                    time.sleep(1)
                    continue
            left = max(deadline - time.time(), 1)
            try:
                r = subprocess.run([sys.executable, "-c", probe], env=self.env,
                                   capture_output=True, timeout=left)  # fmt: skip
            except subprocess.TimeoutExpired:
                break
            if r.returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError(f"the Ray head at {self.address} did not come up in {timeout:.0f} s")

    def pids(self) -> list[int]:
        """The head's processes: ``ray start`` and its descendants (daemons, workers)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self, grace: float = 5) -> None:
        """SIGTERM the group, SIGKILL it after ``grace`` s, then anything it started that
        is still alive (Ray's workers leave the group) or names the temp dir."""
        try:
            started = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            started = []
        end_process_group(self.proc, str(self.tmp), ((signal.SIGTERM, grace), (signal.SIGKILL, 10)),
                          also=started)  # fmt: skip
        psutil.wait_procs([p for p in started if p.is_running()], timeout=10)
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> LocalHead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def end_process_group(
    proc: subprocess.Popen,
    marker: str,
    signals: tuple[tuple[int, float], ...] = ((signal.SIGKILL, 30),),
    also: Sequence[psutil.Process] = (),
) -> None:
    """End what ``proc`` (started with ``start_new_session=True``) started, and only that.

    Its process group gets each signal in turn, waiting up to its seconds for ``proc``
    to exit; then SIGKILL goes to every process in ``also`` that still runs and to every
    process whose command line names ``marker`` (a private temp dir: Ray's daemons and
    workers leave the group). psutil checks a process's creation time before it
    signals, so a recycled pid is never hit.
    """
    for sig, wait in signals:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    me = os.getpid()
    for p in [*also, *psutil.process_iter()]:
        try:
            if p.pid != me and (p in also or marker in " ".join(p.cmdline())):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
