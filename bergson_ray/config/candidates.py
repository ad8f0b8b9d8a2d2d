"""The ``candidates`` section of ``score`` (bergson's ``score_cfg.candidates``).

A cheap method filters, an expensive one ranks: ``--scores`` names an earlier run's
score directory (ours or bergson's) or a ``query --record`` CSV, and only the rows it
ranked best (``--top_k`` / ``--fraction`` per query column, at the ``--direction`` end)
are scored again. The combination checks (exactly one of ``top_k`` and ``fraction``,
bergson's bare ``--top_k``) live on ``ScoreRunConfig``, which also holds ``score.top_k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .sections import require

Direction = Literal["proponents", "detractors"]


@dataclass
class CandidateConfig:
    """Score only the rows an earlier run ranked best (bergson's ``CandidateConfig``).

    The store then has one row per candidate and ``candidates.npy`` beside it names
    their dataset rows, exactly as bergson writes it.
    """

    scores: str = ""
    """Earlier run to rescore: its score directory (ours or bergson's) or the CSV of
    ``query --record``; empty = score every row."""
    top_k: int = 0
    """Rows kept per query column of --scores (per recorded query for a CSV, where 0
    keeps every recorded row). With --scores, a bare --top_k sets this, as in bergson."""
    fraction: float = 0.0
    """Fraction of the rows kept per query column of --scores (set this or --top_k)."""
    direction: Direction = "proponents"
    """Which end of the earlier ranking to keep: proponents (best) or detractors (worst)."""
    higher_is_better: bool | None = None
    """Orientation of the earlier run's scores; unset = read from its config.yaml."""

    def __post_init__(self) -> None:
        require(
            self.direction in ("proponents", "detractors"),
            f"unknown --direction {self.direction!r}; use proponents or detractors",
        )
        require(self.top_k >= 0, "--candidates.top_k must be >= 0")
        require(0.0 <= self.fraction <= 1.0, f"--fraction must be in (0, 1], got {self.fraction}")

    @property
    def active(self) -> bool:
        """Whether this run rescores an earlier run's rows."""
        return bool(self.scores)

    @property
    def from_record(self) -> bool:
        """Whether ``scores`` is a ``query --record`` CSV rather than a score directory."""
        return self.scores.lower().endswith(".csv")
