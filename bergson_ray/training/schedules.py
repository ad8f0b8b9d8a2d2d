"""Learning-rate schedules with bergson 2.5.1's (HF-compatible) formulas.

``lr_schedule(cfg, n)(i)`` is the learning rate of update ``i`` (0-based) of an
``n``-step run: bergson's optimizer reads its schedule at the step count *before*
incrementing it, so the first update uses ``schedule(0)``. Warmup is linear from
``lr_start`` to ``lr``; ``warmup_steps`` >= 1 is a step count, a value in [0, 1) a
fraction of ``n`` rounded up. The decay runs over ``max(n - warmup, 1)`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..config.training import LRScheduleConfig


def warmup_length(cfg: LRScheduleConfig, num_steps: int) -> int:
    """Warmup steps: a count when >= 1, else ``ceil(fraction * num_steps)``."""
    if cfg.warmup_steps >= 1:
        return int(cfg.warmup_steps)
    return math.ceil(num_steps * cfg.warmup_steps)


def lr_schedule(cfg: LRScheduleConfig, num_steps: int) -> Callable[[int], float]:
    """Return ``step -> learning rate`` for a run of ``num_steps`` optimizer updates."""
    warmup = warmup_length(cfg, num_steps)
    decay_steps = max(num_steps - warmup, 1)
    peak, start, kind = cfg.lr, cfg.lr_start, cfg.lr_scheduler_type

    def decayed(step: int) -> float:
        progress = (step - warmup) / decay_steps
        if kind == "linear":
            return peak * (1 - progress)
        if kind == "cosine":
            return peak * 0.5 * (1 + math.cos(math.pi * cfg.num_cycles * 2.0 * progress))
        if kind == "cosine_with_restarts":
            return peak * 0.5 * (1 + math.cos(math.pi * 2.0 * ((cfg.num_cycles * progress) % 1.0)))
        if kind == "polynomial":
            return cfg.lr_end + (peak - cfg.lr_end) * (1 - progress) ** cfg.power
        raise ValueError(f"unknown lr_scheduler_type {kind!r}")

    def schedule(step: int) -> float:
        if kind == "constant":
            return peak
        if step < warmup:
            return start + (peak - start) * (step / max(warmup, 1))
        if kind == "constant_with_warmup":
            return peak
        return float(decayed(step))

    return schedule


def lr_history(schedule: Callable[[int], float], num_steps: int) -> list[dict[str, float]]:
    """Per-update learning rates in HF ``log_history`` form (``step`` counts from 1)."""
    return [{"step": i + 1, "learning_rate": float(schedule(i))} for i in range(num_steps)]
