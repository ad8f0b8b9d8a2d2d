"""Which training states a run keeps (bergson 2.5.1's ``save_mode`` schedules).

A checkpoint ``step_i`` is the state *before* update ``i`` (``step_0`` is the initial
model, ``step_n`` the trained one). bergson saves a state just before each step whose
index the schedule reaches, and after the loop saves ``step_n`` only for the
``interval`` and ``final`` modes when the schedule lands exactly on ``n``. The metagradient
backward pass depends on this exact list, so it is computed, never approximated.
"""

from __future__ import annotations

import math


def next_save_index(current: int, n: int, save_mode: str, save_interval: int = 0) -> int:
    """Index of the checkpoint after the one at ``current`` in an ``n``-step run.

    Always greater than ``current``, so iterating it from 0 enumerates the schedule.
    """
    if save_mode == "final":
        return n
    if save_mode == "all":
        return current + 1
    if save_mode == "interval":
        if save_interval <= 0:
            raise ValueError("save_mode 'interval' needs save_interval > 0")
        return current + save_interval
    if save_mode == "sqrt":
        chunk = math.isqrt(n)
        # the last chunk is saved at every step (the backward pass replays it densely)
        return current + 1 if current >= n - chunk else current + chunk
    if save_mode == "log":
        # halve the remaining distance to the end each time
        return current + max(1, (n - current) // 2)
    raise ValueError(f"unsupported save_mode {save_mode!r}")


def checkpoint_steps(num_steps: int, save_mode: str, save_interval: int = 0) -> list[int]:
    """The states (0..num_steps) bergson's trainer writes for this schedule, ascending."""
    n = num_steps
    steps: list[int] = []
    nxt = n if save_mode == "final" else 0
    for i in range(n):
        if i == nxt:
            steps.append(i)
            nxt = next_save_index(nxt, n, save_mode, save_interval)
    if save_mode in ("interval", "final") and nxt == n:
        steps.append(n)
    return steps
