"""Shared helpers for the benchmark scripts: process-tree memory, timing, bergson's venv.

Benchmarks print figures and ratios; they assert nothing (speed targets live here,
never in unit tests).
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ANCHOR_VENV = Path(os.environ.get("BERGSON_ANCHOR_VENV", "~/.cache/bergson-anchor/anchor-venv")).expanduser()


def bergson_cli() -> Path | None:
    """bergson's CLI from the anchor venv (``../shared/tools/anchor``), if installed."""
    exe = ANCHOR_VENV / "bin" / "bergson"
    return exe if exe.exists() else None


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def tree_rss_mib(pid: int) -> float:
    """Summed RSS of ``pid`` and all its descendants (Ray's raylet, workers, ...)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
        stack += _children(p)
    return total / 2**20


@contextmanager
def peak_rss(pid: int | None = None, every: float = 0.2):
    """Sample the process tree's RSS in a thread; yields a dict filled with ``peak_mib``."""
    pid = pid or os.getpid()
    result = {"peak_mib": 0.0}
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            result["peak_mib"] = max(result["peak_mib"], tree_rss_mib(pid))
            stop.wait(every)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield result
    finally:
        stop.set()
        t.join()


def run_timed(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    """Run a command, return wall seconds, peak RSS of its tree, and its output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    with peak_rss(proc.pid) as mem:
        out, _ = proc.communicate()
    return {"rc": proc.returncode, "wall": time.perf_counter() - t0, "peak_mib": mem["peak_mib"],
            "output": out}


_TQDM = re.compile(r"^(.*?):\s+\d+%\|.*?\| *(\d+)/(\d+) \[([\d:]+)<")


def tqdm_seconds(text: str, label: str) -> float | None:
    """Elapsed seconds of the last tqdm bar whose description contains ``label``."""
    best = None
    for line in text.replace("\r", "\n").split("\n"):
        m = _TQDM.match(line.strip())
        if m and label in m.group(1):
            secs = 0.0
            for part in m.group(4).split(":"):
                secs = secs * 60 + float(part)
            best = secs
    return best


def cpu_busy_percent(seconds: float = 1.0) -> float:
    """Whole-machine CPU use over ``seconds`` (the machine may be shared)."""

    def snap():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
        return vals[3] + vals[4], sum(vals)

    i0, t0 = snap()
    time.sleep(seconds)
    i1, t1 = snap()
    return 100.0 * (1 - (i1 - i0) / max(t1 - t0, 1))
