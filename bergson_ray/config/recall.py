"""Config of ``recall``: grade a score dir by synthetic factual recall (MRR, Recall@k).

Field names and defaults are bergson 2.5.1's (``RecallConfig``, ``RecallDataConfig``):
``--scores``, ``-k/--k``, ``--higher_is_better`` and the data identity ``--num_people``,
``--seed``, ``--single_paraphrase``, ``--data_dir``. The run directory is ``run.run_path``
(the positional RUN_PATH), with the usual ``--overwrite``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sections import RunConfig, require


@dataclass
class RecallDataConfig:
    """Which synthetic facts datasets were trained on and scored (their identity)."""

    num_people: int = 1000
    """Synthetic people to generate facts for (at most 9600 with the built-in name lists)."""
    seed: int = 0
    """Seed of the people's names and facts; part of the datasets' identity."""
    single_paraphrase: bool = False
    """Keep one statement per person and field, so each question has exactly one gold document."""
    data_dir: str = "data"
    """Directory of the names/ and templates/ lists (written there if missing) and the cached *.hf datasets."""

    def __post_init__(self) -> None:
        require(
            not isinstance(self.num_people, bool) and self.num_people >= 1,
            f"--num_people must be >= 1, got {self.num_people}",
        )
        require(bool(self.data_dir), "--data_dir must name a directory")


@dataclass
class RecallConfig:
    """bergson's ``recall``: rank every statement per question by its score, find the gold ones."""

    run: RunConfig = field(default_factory=RunConfig)
    scores: str = ""
    """Score dir (ours or bergson's) with one row per statement and one column per question."""
    data: RecallDataConfig = field(default_factory=RecallDataConfig)
    k: int = 10
    """Cutoff for Recall@k."""
    higher_is_better: bool | None = None
    """True when a higher score is a stronger proponent; None reads it from the score dir's config.yaml (else true)."""

    def __post_init__(self) -> None:
        require(bool(self.scores), "recall needs --scores SCORE_DIR (scores of the statements)")
        require(
            not isinstance(self.k, bool) and isinstance(self.k, int) and self.k >= 1,
            f"-k must be a whole number >= 1, got {self.k!r}",
        )


__all__ = ["RecallConfig", "RecallDataConfig"]
