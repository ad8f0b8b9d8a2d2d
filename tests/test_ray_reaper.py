"""The reaper on plain processes (no Ray): it ends exactly the tree it was handed once the
driver is gone, however the driver goes, and leaves everything else alone."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from helpers import process_alive

from bergson_ray.utils import ray_reaper

TREE = """
import subprocess, sys, time
# a root (the "raylet") whose child (a "worker") starts a grandchild and then exits: the
# grandchild is re-parented away from the root, reachable only through what was recorded
child = subprocess.Popen([sys.executable, "-c", '''
import subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(g.pid, flush=True)
time.sleep(1.5)
'''], stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(600)
"""


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(ray_reaper, "POLL_S", 0.1)
    monkeypatch.setattr(ray_reaper, "GRACE_S", 0.1)
    monkeypatch.setattr(ray_reaper, "TERM_WAIT_S", 2.0)


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def _tree() -> tuple[subprocess.Popen, list[int]]:
    root = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    child, grandchild = (int(x) for x in root.stdout.readline().split())
    return root, [root.pid, child, grandchild]


def _end(*procs: subprocess.Popen) -> None:
    for p in procs:  # only what this test started, by id
        p.kill()
        p.wait(timeout=5)


@pytest.mark.parametrize("driver_goes", ["sigkill_and_reaped_at_once", "before_the_reaper_starts"])
def test_the_recorded_tree_ends_with_the_driver_and_nothing_else(fast, driver_goes):
    """The driver SIGKILLed and reaped by its parent at once (the moment the reaper's
    'alive and not a zombie' check used to raise and leave the agents running), or already
    gone when the reaper starts: the whole tree ends, a bystander lives on."""
    driver, bystander = _sleeper(), _sleeper()
    root, tree = _tree()
    try:
        spec = [(root.pid, psutil.Process(root.pid).create_time())]
        if driver_goes == "before_the_reaper_starts":
            driver.kill()
            driver.wait()
        reaper = threading.Thread(target=ray_reaper.reap, args=(driver.pid, spec))
        reaper.start()
        if driver_goes == "sigkill_and_reaped_at_once":
            deadline = time.monotonic() + 10  # the child exits 1.5 s after its start
            while psutil.Process(tree[2]).ppid() == tree[1] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert psutil.Process(tree[2]).ppid() != tree[1], "the grandchild kept its parent"
            driver.send_signal(signal.SIGKILL)
            driver.wait()
        reaper.join(timeout=15)
        assert not reaper.is_alive()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(process_alive(p) for p in tree):
            time.sleep(0.1)
        assert [p for p in tree if process_alive(p)] == []
        assert bystander.poll() is None, "the reaper ended a process it was not handed"
    finally:
        _end(driver, bystander, root)
        for pid in tree[1:]:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


def test_a_recycled_pid_is_never_ended(fast):
    """A root whose pid now names another process (different creation time) is skipped."""
    driver, other = _sleeper(), _sleeper()
    try:
        driver.kill()
        driver.wait()
        ray_reaper.reap(driver.pid, [(other.pid, psutil.Process(other.pid).create_time() - 5)])
        assert other.poll() is None
    finally:
        _end(driver, other)
