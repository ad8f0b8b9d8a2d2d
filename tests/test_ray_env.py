"""``init_ray``: which cluster a command joins (mocked), and that the local Ray a driver
started does not outlive it (one real driver, in a subprocess)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
from helpers import process_alive, subprocess_env

from bergson_ray.utils import ray_env


def _capture(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray_env, "check_reachable", lambda address, timeout_s=3.0: None)
    return calls


def test_empty_ray_address_means_a_local_ray(monkeypatch):
    calls = _capture(monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", "  ")
    ray_env.init_ray(None)
    assert calls[0]["address"] is None and calls[0]["include_dashboard"] is False
    import os

    assert "RAY_ADDRESS" not in os.environ


def test_explicit_address_wins_over_the_environment(monkeypatch):
    calls = _capture(monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6399")
    ray_env.init_ray("auto")
    assert calls[0]["address"] == "auto" and "include_dashboard" not in calls[0]
    calls.clear()
    ray_env.init_ray(None)
    assert calls[0]["address"] == "127.0.0.1:6399"


def test_more_workers_than_a_local_ray_can_place_are_capped(monkeypatch):
    """``--num_workers 64`` on a 2-CPU local Ray used to wait forever for CPUs that never
    come; a local Ray never grows, so the pool is capped (a cluster only gets a warning)."""
    from bergson_ray.config import RayConfig
    from bergson_ray.pipelines import placement, workers

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_env, "cluster_cpus", lambda: 2.0)
    monkeypatch.setattr(placement, "gpu_capacity", lambda: (0, 0))
    assert workers.worker_pool(RayConfig(num_workers=64)).size == 4
    assert workers.worker_pool(RayConfig(num_workers=3)).size == 3
    assert workers.worker_pool(RayConfig(num_workers=64, cpus_per_worker=1)).size == 2
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6399")
    assert workers.worker_pool(RayConfig(num_workers=64)).size == 64


def test_a_remote_traceback_prints_as_its_last_sentence(capsys):
    """Ray sometimes hands back a user error whose message is the remote traceback; the
    CLI still prints one line (``query --k 0`` against a service)."""
    from bergson_ray.cli.main import _guarded
    from bergson_ray.errors import BadInputError

    remote = BadInputError(
        "ray::QueryActor.query() (pid=7, ip=127.0.0.1)\n"
        '  File "/x/faiss_index.py", line 252, in check_k\n'
        "    raise BadInputError(...)\n"
        "bergson_ray.errors.BadInputError: k must be >= 1, got 0"
    )

    def fail():
        raise remote

    assert _guarded(fail) == 2
    assert capsys.readouterr().err == "error: k must be >= 1, got 0\n"
    multi = BadInputError("two lines\nof our own")
    assert _guarded(lambda: (_ for _ in ()).throw(multi)) == 2
    assert capsys.readouterr().err == "error: two lines\nof our own\n"


def test_a_dead_address_is_an_error_within_seconds():
    """``ray.init`` would retry a dead GCS address for minutes; a TCP probe says no at once."""
    import socket
    import time

    import pytest

    from bergson_ray.errors import BadInputError

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(BadInputError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        ray_env.check_reachable(f"127.0.0.1:{port}")  # what init_ray runs before ray.init
    print(f"dead address refused after {time.perf_counter() - t0:.2f}s")
    with pytest.raises(BadInputError, match="not host:port"):
        ray_env.check_reachable("127.0.0.1:http")
    ray_env.check_reachable("auto")  # left to Ray


def _record_head(monkeypatch, tmp_path, address: str | None) -> None:
    """Point Ray's temp dir at ``tmp_path`` and record ``address`` there as ``ray start``
    does (None: nothing recorded)."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    if address is not None:
        (tmp_path / "ray").mkdir(exist_ok=True)
        (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")


@pytest.mark.parametrize("address", [None, "127.0.0.1:6391"])
def test_the_recorded_head_is_read_as_ray_reads_it(monkeypatch, tmp_path, address):
    """``recorded_local_head`` reads Ray's file itself (so asking imports no Ray); it must
    find what Ray's own lookup finds, for RAY_TMPDIR and TMPDIR alike."""
    from ray._private.services import find_bootstrap_address

    _record_head(monkeypatch, tmp_path, address)
    assert ray_env.recorded_local_head() == address == (find_bootstrap_address(None) or None)
    monkeypatch.delenv("RAY_TMPDIR")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert ray_env.recorded_local_head() == address == (find_bootstrap_address(None) or None)


def test_a_dead_recorded_head_starts_a_fresh_local_ray(monkeypatch, tmp_path):
    """A crashed ``ray start`` head left in Ray's temp dir used to make every later plain
    command retry it for minutes; now the command starts its own local Ray at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    _record_head(monkeypatch, tmp_path, dead)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_env.stale_local_head() == dead
    calls = _capture(monkeypatch)
    monkeypatch.setattr(ray_env, "stale_local_head", lambda: dead)
    ray_env.init_ray(None)
    assert calls[0]["address"] == "local"


def test_no_recorded_head_is_not_stale(monkeypatch, tmp_path):
    _record_head(monkeypatch, tmp_path, None)
    assert ray_env.stale_local_head() is None


DRIVER = """
import json, sys, time
from bergson_ray.utils.ray_env import init_ray
init_ray(num_cpus=1)
import ray, psutil
ray.get(ray.remote(lambda: 1).remote())  # a worker exists too
me = psutil.Process()
print(json.dumps([p.pid for p in me.children(recursive=True)]), flush=True)
time.sleep(600)
"""


@pytest.mark.ray
def test_a_sigkilled_driver_leaves_no_ray_processes():
    """SIGKILL the driver (no clean-up of its own can run): the GCS, raylet, agents and
    workers its local Ray started are gone within seconds, ended by the reaper."""
    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True,
        env=subprocess_env(), start_new_session=True,
    )  # fmt: skip
    pids: list[int] = []
    try:
        pids = json.loads(proc.stdout.readline())
        ray_pids = [p for p in pids if psutil.pid_exists(p)]
        assert len(ray_pids) >= 3, f"expected Ray's processes under the driver, got {pids}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(process_alive(p) for p in ray_pids):
            time.sleep(0.25)
        left = [p for p in ray_pids if process_alive(p)]
        assert not left, f"Ray processes still running 20 s after the driver died: {left}"
    finally:
        for pid in [proc.pid, *pids]:  # only what this test started, by id
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


JOIN_AND_DETACH = """
import ray, sys
ray.init(address=sys.argv[1])
@ray.remote(num_cpus=0)
class Keep:
    def pid(self):
        import os
        return os.getpid()
keep = Keep.options(name="keep", lifetime="detached").remote()
print(ray.get(keep.pid.remote()), flush=True)
"""


@pytest.mark.ray
def test_a_local_head_stops_every_process_it_started():
    """The head that tests and benchmarks start (``testing/ray_head.py``) ends all it
    started, a detached actor's worker included (it leaves the head's process group and
    its command line does not name the temp dir), and removes its temp dir."""
    from bergson_ray.testing.ray_head import LocalHead

    head = LocalHead(num_cpus=1, env=subprocess_env())
    pids: list[int] = []
    try:
        out = subprocess.run(
            [sys.executable, "-c", JOIN_AND_DETACH, head.address], env=subprocess_env(),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        actor = int(out.stdout.split()[-1])
        pids = head.pids()
        assert actor in pids and len(pids) >= 4, pids  # ray start, GCS, raylet, the actor
        assert os.getpgid(actor) != os.getpgid(head.proc.pid)
    finally:
        head.stop()
    left = [p for p in pids if process_alive(p)]
    assert not left, f"still running after stop(): {left}"
    assert not head.tmp.exists()
