"""Checkpoints into segments, and each segment's summed learning rate ``η_l K_l``.

SOURCE splits ``C`` checkpoints (in training order) into ``L`` equal segments; segment
``l`` holds checkpoints ``l·C/L .. (l+1)·C/L - 1`` and covers the optimizer steps after
the previous segment's last checkpoint up to its own last one. Its ``η_l K_l`` is the sum
of the learning rates of those steps (bergson: ``lr_list · step_size_list`` when given),
times ``1/(1-β)`` for SGD heavy-ball momentum β (the terminal velocity, Bae et al.
App. D.2). Steps follow the HF ``log_history`` convention: entry ``step = s`` is the
``s``-th update (1-based), and checkpoint ``N`` is the state after ``N`` updates.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import BadInputError

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_STEP = re.compile(r"^step_(\d+)(?:\.ckpt)?$")


def checkpoint_step(path: str | Path) -> int | None:
    """The training step a checkpoint's name encodes (``checkpoint-N``, ``step_N[.ckpt]``
    or a bare ``N``), or None."""
    name = Path(str(path).rstrip("/")).name
    for pattern in (_CHECKPOINT, _STEP):
        m = pattern.match(name)
        if m:
            return int(m.group(1))
    return int(name) if name.isdigit() else None


def segment_indices(num_checkpoints: int, segments: int) -> list[list[int]]:
    """Checkpoint indices of each segment (``C`` must be a multiple of ``L``)."""
    if segments < 1:
        raise BadInputError(f"--segments must be >= 1, got {segments}")
    if num_checkpoints < 1:
        raise BadInputError("no checkpoints to split into segments")
    if num_checkpoints % segments:
        raise BadInputError(
            f"{num_checkpoints} checkpoints cannot be split into {segments} equal segments; "
            "pass a --segments that divides the number of checkpoints"
        )
    per = num_checkpoints // segments
    return [list(range(s * per, (s + 1) * per)) for s in range(segments)]


def momentum_scale(momentum: float | None) -> float:
    """``1 / (1 - β)``: how far heavy-ball momentum stretches each step."""
    beta = 0.0 if momentum is None else float(momentum)
    if not 0.0 <= beta < 1.0:
        raise BadInputError(f"--momentum must be in [0, 1), got {beta}")
    return 1.0 / (1.0 - beta)


def lr_times_steps_from_lists(
    lr_list: Sequence[float], step_size_list: Sequence[int], momentum: float | None
) -> list[float]:
    """``η_l K_l`` per segment from explicit per-segment mean LRs and step counts."""
    scale = momentum_scale(momentum)
    return [float(lr) * int(k) * scale for lr, k in zip(lr_list, step_size_list)]


def segment_boundaries(steps: Sequence[int], segments: int) -> list[int]:
    """``[0, end_0, ..., end_{L-1}]``: each segment ends at its last checkpoint's step."""
    groups = segment_indices(len(steps), segments)
    ends = [int(steps[g[-1]]) for g in groups]
    bounds = [0, *ends]
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise BadInputError(
            f"checkpoint steps {list(steps)} are not in training order; list --checkpoints "
            "from the earliest to the latest"
        )
    return bounds


def lr_times_steps(
    boundaries: Sequence[int], step_to_lr: Mapping[int, float], momentum: float | None
) -> list[float]:
    """``η_l K_l = scale · Σ_{s = b_l + 1}^{b_{l+1}} lr_s`` (steps absent from the history
    count 0, as bergson)."""
    scale = momentum_scale(momentum)
    return [
        scale * sum(float(step_to_lr.get(s, 0.0)) for s in range(lo + 1, hi + 1))
        for lo, hi in zip(boundaries[:-1], boundaries[1:])
    ]


def step_to_lr(log_history: Sequence[Mapping]) -> dict[int, float]:
    """``{step: learning_rate}`` from an HF-shaped ``log_history`` list (other entries,
    such as evaluation records without a learning rate, are skipped)."""
    out: dict[int, float] = {}
    for entry in log_history:
        if isinstance(entry, Mapping) and "step" in entry and "learning_rate" in entry:
            out[int(entry["step"])] = float(entry["learning_rate"])
    return out
