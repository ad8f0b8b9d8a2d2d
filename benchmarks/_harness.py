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

import psutil

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


def head_roots(head) -> tuple[int, ...]:
    """The roots to count in a joined-head run's RSS (:func:`peak_rss`'s ``also``): a
    :class:`~bergson_ray.testing.ray_head.LocalHead`'s daemons (GCS, raylet and the rest;
    workers are the raylet's children), not the ``ray start --block`` process holding
    them (200 MiB that README's ``ray start --head``, which returns, does not keep)."""
    try:
        return tuple(c.pid for c in psutil.Process(head.proc.pid).children())
    except psutil.NoSuchProcess:
        return ()


@contextmanager
def peak_rss(pid: int | None = None, every: float = 0.2, also: tuple[int, ...] = ()):
    """Sample the process tree's RSS in a thread; yields a dict filled with ``peak_mib``.

    ``also``: roots of further trees summed into each sample (a running Ray head, whose
    workers a joining command's tree does not contain)."""
    pid = pid or os.getpid()
    result = {"peak_mib": 0.0}
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            now = tree_rss_mib(pid) + sum(tree_rss_mib(p) for p in also)
            result["peak_mib"] = max(result["peak_mib"], now)
            stop.wait(every)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield result
    finally:
        stop.set()
        t.join()


def run_timed(
    cmd: list[str], env: dict | None = None, cwd: str | None = None, also: tuple[int, ...] = ()
) -> dict:
    """Run a command, return wall seconds, peak RSS of its tree (plus the trees under
    ``also``, see :func:`peak_rss`), and its output.

    ``stamped`` holds each output line (tqdm's ``\r`` updates count as lines) with the
    time it arrived, so a progress bar's span is known to its refresh interval (0.1 s)
    instead of the whole seconds tqdm prints (:func:`tqdm_seconds`).
    """
    import codecs

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, cwd=cwd)  # fmt: skip
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stamped: list[tuple[float, str]] = []
    partial = ""
    with peak_rss(proc.pid, also=also) as mem:
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            now = time.perf_counter()
            *done, partial = re.split(r"[\r\n]", partial + decoder.decode(chunk))
            stamped.extend((now, line) for line in done)
        proc.wait()
    stamped.append((time.perf_counter(), partial + decoder.decode(b"", final=True)))
    return {"rc": proc.returncode, "wall": time.perf_counter() - t0, "peak_mib": mem["peak_mib"],
            "output": "\n".join(line for _, line in stamped), "stamped": stamped}


_TQDM = re.compile(r"^(.*?):\s+\d+%\|.*?\| *(\d+)/(\d+) \[([\d:]+)<")


def bar_spans(run: str | dict, labels: tuple[str, ...]) -> dict[str, float]:
    """Seconds per tqdm bar (by description) whose description contains one of ``labels``.

    From a :func:`run_timed` result: the time between the bar's first and last printed
    state, as they arrived (tqdm prints the bar when it is made and when it closes). From
    plain text: the last elapsed time the bar printed, in whole seconds.
    """
    lines = run.get("stamped") if isinstance(run, dict) else None
    if lines is None:
        text = run["output"] if isinstance(run, dict) else run
        lines = [(None, line) for line in text.replace("\r", "\n").split("\n")]
    first: dict[str, float] = {}
    spans: dict[str, float] = {}
    for t, line in lines:
        m = _TQDM.match(line.strip())
        if not m or not any(lab in m.group(1) for lab in labels):
            continue
        desc = m.group(1)
        if t is None:
            secs = 0.0
            for part in m.group(4).split(":"):
                secs = secs * 60 + float(part)
            spans[desc] = secs
        else:
            first.setdefault(desc, t)
            spans[desc] = t - first[desc]
    return spans


def tqdm_seconds(run: str | dict, label: str) -> float | None:
    """Seconds of the last tqdm bar whose description contains ``label`` (see :func:`bar_spans`)."""
    spans = bar_spans(run, (label,))
    return list(spans.values())[-1] if spans else None


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
