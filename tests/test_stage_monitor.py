"""The driver's accounting of a stage (``utils/metrics.StageMonitor``), without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from bergson_ray.utils import metrics


@pytest.fixture
def clock(monkeypatch):
    """A settable ``time.perf_counter`` for the monitor."""
    now = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    return now


def batch(worker: int, first_row: int, rows: int = 4, tokens: int = 25) -> dict[str, np.ndarray]:
    return {
        "idx": np.arange(first_row, first_row + rows),
        "length": np.full(rows, tokens),
        "worker": np.full(rows, worker, dtype=np.int32),
    }


def test_all_busy_rate_is_the_pools_rate_while_every_worker_runs(clock):
    """Worker A delivers 100 tokens a second from t=1 to 10; B starts late (4.5) and
    ends early (8.5). While both run the pool makes 200 tokens/s: the all-busy rate is
    exactly that, where first-to-last batch (``steady``) is diluted by A working alone."""
    mon = metrics.StageMonitor("s", total=60)
    events = [(t, 1) for t in range(1, 11)] + [(4.5 + k, 2) for k in range(5)]
    row = 0
    for t, worker in sorted(events):
        clock[0] = t
        mon.update(batch(worker, row))
        row += 4
    s = mon.summary()
    assert s["all_busy_tokens_per_second"] == pytest.approx(200.0)
    assert s["all_busy_seconds"] == pytest.approx(4.0)
    assert s["steady_tokens_per_second"] == pytest.approx(1400 / 9, abs=0.1)
    assert s["workers_seen"] == 2 and s["rows_per_worker_min_max"] == [20, 40]
    assert s["rows_received"] == 60 and s["duplicate_rows"] == 0


def test_no_all_busy_rate_when_the_workers_never_overlapped(clock):
    """A worker replaced by another (a crash, a lost node) never ran beside it: no
    interval where both were busy, so no all-busy figure rather than a wrong one."""
    mon = metrics.StageMonitor("s", total=16)
    for k, (t, worker) in enumerate([(1, 7), (2, 7), (3, 9), (4, 9)]):
        clock[0] = t
        mon.update(batch(worker, 4 * k))
    s = mon.summary()
    assert "all_busy_tokens_per_second" not in s
    assert s["workers_seen"] == 2 and s["rows_per_worker_min_max"] == [8, 8]


def test_one_worker_all_busy_equals_steady(clock):
    mon = metrics.StageMonitor("s", total=12)
    for k, t in enumerate([2.0, 2.5, 4.0]):
        clock[0] = t
        mon.update(batch(3, 4 * k))
    s = mon.summary()
    assert s["all_busy_tokens_per_second"] == s["steady_tokens_per_second"] == pytest.approx(100.0)


def windows(worker: int, first_row: int, spans) -> list[dict[str, np.ndarray]]:
    """Output batches of ``worker``, one per ``(start, done[, tokens])`` busy span (100
    tokens by default), 4 rows each."""
    out = []
    for k, (start, done, *tokens) in enumerate(spans):
        b = batch(worker, first_row + 4 * k, tokens=(tokens or [100])[0] // 4)
        b["done_wall"] = np.full(4, float(done))
        b["compute_s"] = np.full(4, (done - start) / 4, dtype=np.float32)
        out.append(b)
    return out


def test_all_busy_rate_from_the_workers_clocks_counts_windows_by_their_share(clock):
    """Two workers, 100 tokens per 2-s window: A busy from 0 to 12, B from 3 to 11 with
    an idle second at 7-8. While both exist (3 to 11) A makes 50 tokens/s and B 7 of 8
    seconds of it at 50 (its last window: 52 tokens in 1 s): 94 tokens/s. Receipt times, here arriving all at once, could
    not place the windows at all; partial windows at the ends count their share."""
    a = windows(1, 0, [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)])
    b = windows(2, 100, [(3, 5), (5, 7), (8, 10), (10, 11, 52)])
    mon = metrics.StageMonitor("s", total=200)
    clock[0] = 20.0
    for out in a + b:
        mon.update(out)
    s = mon.summary()
    assert s["all_busy_seconds"] == pytest.approx(8.0)
    # A: half of (2,4), three whole windows, half of (10,12) = 400 tokens; B: 352
    assert s["all_busy_tokens_per_second"] == pytest.approx(752 / 8, abs=0.1)


def test_all_busy_rate_from_the_workers_clocks_one_worker_and_no_overlap(clock):
    mon = metrics.StageMonitor("s", total=200)
    for out in windows(5, 0, [(1, 3), (3, 5), (6, 8)]):  # an idle second inside
        mon.update(out)
    assert mon.summary()["all_busy_tokens_per_second"] == pytest.approx(300 / 7, abs=0.1)
    apart = metrics.StageMonitor("s", total=200)
    for out in windows(1, 0, [(0, 2)]) + windows(2, 100, [(3, 5)]):  # a replacement worker
        apart.update(out)
    s = apart.summary()
    assert "all_busy_tokens_per_second" not in s and s["workers_seen"] == 2
