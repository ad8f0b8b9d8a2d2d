"""What a run directory holds, told from the files in it (no config needed).

A report covers two kinds of result:

* ``score`` — a score store (``scores.bin`` + ``info.json``): ``score`` itself, or the
  ``scores/`` step inside an ``ekfac``, ``trackstar`` or ``magic`` run (ours or bergson's);
* ``validate`` — a ``validate`` run (``summary.csv``/``validation.csv`` for the LDS,
  ``weight_step.csv``, ``filter_summary.csv``...), or the ``validation/`` inside a
  ``magic`` run.

A directory can hold both (``magic`` with validation); anything else is refused with
one sentence that says what was looked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError

SCORE = "score"
VALIDATE = "validate"

SCORE_FILES = ("scores.bin", "info.json")
"""A score store has both."""
VALIDATE_MARKERS = ("summary.csv", "validation.csv", "weight_step.csv", "filter_summary.csv")
"""Any one of these (or a ``validation_<a>_<b>.csv`` / ``summary_<a>_<b>.csv`` slice)
makes a directory a validate run."""
NESTED = {"scores": SCORE, "validation": VALIDATE}
"""Sub-directories a multi-step run keeps its results in (ekfac/trackstar/magic)."""


@dataclass(frozen=True)
class Part:
    """One reportable result: its kind and the directory that holds it."""

    kind: str
    path: Path


def is_score_store(path: Path) -> bool:
    return all((path / name).is_file() for name in SCORE_FILES)


def is_validate_run(path: Path) -> bool:
    if any((path / name).is_file() for name in VALIDATE_MARKERS):
        return True
    return any(path.glob("validation_*_*.csv")) or any(path.glob("summary_*_*.csv"))


def _own_kind(path: Path) -> str | None:
    if is_score_store(path):
        return SCORE
    if is_validate_run(path):
        return VALIDATE
    return None


def detect(run: str | Path) -> list[Part]:
    """Every result in ``run``: the directory itself, else its ``scores/`` and
    ``validation/`` steps. Raises :class:`BadInputError` with one sentence otherwise."""
    path = Path(run)
    if not path.is_dir():
        part = path.with_name(path.name + ".part")
        hint = f" ({part} exists: that run did not finish)" if part.is_dir() else ""
        raise BadInputError(f"{path} is not a directory{hint}")
    kind = _own_kind(path)
    if kind is not None:
        return [Part(kind, path)]
    found = [
        Part(kind, path / sub)
        for sub, kind in NESTED.items()
        if (path / sub).is_dir() and _own_kind(path / sub) == kind
    ]
    if found:
        return found
    raise BadInputError(
        f"{path} is neither a score run (scores.bin and info.json, here or in scores/) nor a "
        "validate run (summary.csv, validation.csv, weight_step.csv or filter_summary.csv, "
        "here or in validation/), so there is nothing to report"
    )
