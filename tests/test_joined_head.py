"""Commands that join a running head (README, "Keeping Ray up between commands") leave it
as they found it: after build, reduce and hessian on Ray pools the head runs exactly the
processes it ran before, so a head kept up for days does not grow with every command, and
no command ends a process of the head's. Ray Data's three helper actors are created by
the first command on the head and live on (they are detached); that command runs before
the baseline is taken.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import rows_of, subprocess_env

from bergson_ray.testing.ray_head import LocalHead

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BIN = Path(sys.executable).parent
TINY = ["--model", "tiny", "--dataset", "tiny", "--split", "train[:12]", "--projection_dim", "8",
        "--truncation", "--token_batch_size", "4096", "--executor", "ray"]  # fmt: skip


def head_processes(head: LocalHead) -> set[tuple[int, float, str]]:
    """(pid, creation time, name) of the head's processes, a recycled pid being a new
    one. Idle workers (``ray::IDLE``) are left out: Ray keeps up to one per CPU and may
    replace them at will; :func:`idle_workers` counts them."""
    out = set()
    for pid in head.pids():
        try:
            proc = psutil.Process(pid)
            if proc.name() != "ray::IDLE":
                out.add((pid, proc.create_time(), proc.name()))
        except psutil.NoSuchProcess:
            pass
    return out


def idle_workers(head: LocalHead) -> int:
    n = 0
    for pid in head.pids():
        try:
            n += psutil.Process(pid).name() == "ray::IDLE"
        except psutil.NoSuchProcess:
            pass
    return n


def settled(head: LocalHead, want: set | None = None, timeout: float = 60) -> set:
    """:func:`head_processes` once a job's workers have exited: unchanged for 3 s (or
    equal to ``want``, if given), else what is there at ``timeout``."""
    deadline = time.monotonic() + timeout
    last, since = head_processes(head), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = head_processes(head)
        if want is not None and now == want:
            return now
        if now != last:
            last, since = now, time.monotonic()
        elif want is None and time.monotonic() - since >= 3:
            return now
    return last


def join(head: LocalHead, *args: str) -> subprocess.CompletedProcess:
    env = subprocess_env(RAY_ADDRESS=head.address, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    res = subprocess.run([str(BIN / "bergson-ray"), *args], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def test_commands_on_a_running_head_leave_it_as_they_found_it(tmp_path):
    with LocalHead(num_cpus=2, env=subprocess_env()) as head:
        join(head, "build", str(tmp_path / "first"), *TINY)  # creates Ray Data's helpers
        before = settled(head)
        names = {name for _, _, name in before}
        assert "raylet" in names and "gcs_server" in names, names
        assert "ray::_StatsActor" in names, f"the first command did not join the head: {names}"

        join(head, "build", str(tmp_path / "idx"), *TINY)
        join(head, "reduce", str(tmp_path / "mean"), *TINY)
        join(head, "hessian", str(tmp_path / "h"), *TINY, "--method", "kfac", "--num_shards", "2")
        after = settled(head, want=before)

        assert after - before == set(), f"left running: {sorted(after - before)}"
        assert before - after == set(), f"ended: {sorted(before - after)}"
        assert idle_workers(head) <= 2  # Ray's own bound: one idle worker per CPU
        # the commands did their work on the head: the same rows as the first build
        assert (rows_of(tmp_path / "idx") == rows_of(tmp_path / "first")).all()
