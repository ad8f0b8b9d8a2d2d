"""What a validate run's report shows, as plain data (no plotting, no HTML).

Read from the files ``validate`` writes (ours and bergson's share names and columns,
see ``validation/csv_out.py``):

* ``summary.csv`` (or ``summary_<a>_<b>.csv`` slices): the LDS of each query — Spearman
  (and Pearson) between the actual and the predicted loss change over the subsets;
* ``validation.csv`` (or slices): per subset and query, ``diff`` (actual loss change,
  baseline minus the retrained model's loss) and ``score_sum`` (predicted: the summed
  loss-signed scores of the removed documents);
* ``weight_step.csv``: ``diff`` against ``predicted_diff`` per learning rate;
* any other CSV (the filter's tables) is shown as a table.

Several validate runs that retrained on the same subsets (one bank, or equal
``subsets.json``) are compared: the LDS per query and its mean, per run (= per method).
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError
from ..store.files import find_key, read_yaml
from .score_report import scalar_summary

SLICE = re.compile(r"^(summary|validation)_(\d+)_(\d+)\.csv$")
WEIGHT_STEP_CSV = "weight_step.csv"
SUBSETS_JSON = "subsets.json"
MAX_TABLE_ROWS = 50


@dataclass
class QueryLds:
    """One row of ``summary.csv``; ``part`` names the slice (``""`` for the whole run)."""

    query: int
    spearman: float
    spearman_p: float
    pearson: float
    pearson_p: float
    n: int
    baseline: float
    part: str = ""


@dataclass
class Points:
    """Predicted against actual loss change of one query (one point per subset or lr)."""

    query: int
    predicted: np.ndarray
    actual: np.ndarray


@dataclass
class Table:
    name: str
    columns: list[str]
    rows: list[list[str]]
    total_rows: int


@dataclass
class ValidateReport:
    path: Path
    label: str
    summary: dict[str, Any]
    lds: list[QueryLds]
    points: list[Points]
    weight_step: list[Points]
    tables: list[Table]
    scores_path: str | None = None
    bank_key: str | None = None
    bank_label: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or ("lds" if self.lds else "validate"))

    def lds_of(self, part: str | None = None) -> list[QueryLds]:
        """LDS rows of one part: the whole run's when there is one, else the first slice's."""
        parts = list(dict.fromkeys(r.part for r in self.lds))
        if part is None:
            part = "" if "" in parts else (parts[0] if parts else "")
        return [r for r in self.lds if r.part == part]

    @property
    def mean_lds(self) -> float:
        vals = np.array([r.spearman for r in self.lds_of()], dtype=np.float64)
        return float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise BadInputError(f"cannot read {path}: {err}") from err
    if not rows:
        return [], []
    return rows[0], [r for r in rows[1:] if r]


def _num(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return math.nan


def _records(path: Path, required: list[str]) -> list[dict[str, float]]:
    header, rows = _read_csv(path)
    missing = [c for c in required if c not in header]
    if missing:
        raise BadInputError(f"{path} has no column {missing[0]!r} (columns: {header})")
    return [{h: _num(v) for h, v in zip(header, r)} for r in rows]


def _slice_label(path: Path) -> str:
    m = SLICE.match(path.name)
    return f"subsets {m.group(2)}-{int(m.group(3)) - 1}" if m else ""


def _files(run: Path, stem: str) -> list[Path]:
    """``<stem>.csv`` when present, else its slices in order of their first subset."""
    whole = run / f"{stem}.csv"
    if whole.is_file():
        return [whole]
    found = [p for p in run.glob(f"{stem}_*_*.csv") if SLICE.match(p.name)]
    return sorted(found, key=lambda p: int(SLICE.match(p.name).group(2)))


def read_lds(run: Path) -> list[QueryLds]:
    cols = ["spearman_corr", "spearman_p", "pearson_corr", "pearson_p", "N", "baseline_loss"]
    out = []
    for path in _files(run, "summary"):
        part = _slice_label(path)
        for i, r in enumerate(_records(path, cols)):
            q = r.get("query", i)
            out.append(
                QueryLds(
                    int(q) if math.isfinite(q) else i,
                    r["spearman_corr"],
                    r["spearman_p"],
                    r["pearson_corr"],
                    r["pearson_p"],
                    int(r["N"]) if math.isfinite(r["N"]) else 0,
                    r["baseline_loss"],
                    part,
                )
            )
    return out


def _points(records: list[dict[str, float]], predicted: str, actual: str) -> list[Points]:
    by_query: dict[int, list[tuple[float, float]]] = {}
    for r in records:
        by_query.setdefault(int(r.get("query", 0)), []).append((r[predicted], r[actual]))
    return [
        Points(q, np.array([p for p, _ in pts]), np.array([a for _, a in pts]))
        for q, pts in sorted(by_query.items())
    ]


def read_points(run: Path) -> list[Points]:
    records = [r for p in _files(run, "validation") for r in _records(p, ["diff", "score_sum"])]
    return _points(records, "score_sum", "diff")


def read_weight_step(run: Path) -> list[Points]:
    path = run / WEIGHT_STEP_CSV
    if not path.is_file():
        return []
    return _points(_records(path, ["diff", "predicted_diff"]), "predicted_diff", "diff")


def other_tables(run: Path) -> list[Table]:
    """Every CSV not already plotted (the filter's tables), first rows only."""
    used = {WEIGHT_STEP_CSV} | {p.name for s in ("summary", "validation") for p in _files(run, s)}
    tables = []
    for path in sorted(run.glob("*.csv")):
        if path.name in used or SLICE.match(path.name):
            continue
        header, rows = _read_csv(path)
        tables.append(Table(path.name, header, rows[:MAX_TABLE_ROWS], len(rows)))
    return tables


def bank_identity(run: Path, config: Any) -> tuple[str | None, str]:
    """``(key, label)``: runs with the same key retrained the same subsets. The bank
    paths when the LDS used ``--subsets bank``, else a digest of ``subsets.json``."""
    lds = find_key(config, "lds")
    if isinstance(lds, dict) and lds.get("subsets") == "bank" and lds.get("paths"):
        paths = sorted(str(Path(p).expanduser().resolve()) for p in lds["paths"])
        return "bank:" + "|".join(paths), "bank " + ", ".join(paths)
    subsets = run / SUBSETS_JSON
    if subsets.is_file():
        digest = hashlib.sha1(subsets.read_bytes()).hexdigest()[:10]
        return f"subsets:{digest}", f"subsets.json {digest}"
    return None, ""


def run_label(run: Path) -> str:
    """A run's name in tables and legends (``RUN/validation`` is named after ``RUN``)."""
    return run.parent.name if run.name == "validation" and run.parent.name else run.name


def validate_report(path: str | Path) -> ValidateReport:
    path = Path(path)
    config_path = path / "config.yaml"
    config = None
    if config_path.is_file():
        try:
            config = read_yaml(config_path)
        except Exception:  # noqa: BLE001 - labels only
            config = None
    scores = find_key(config, "scores")
    key, bank_label = bank_identity(path, config)
    report = ValidateReport(
        path=path,
        label=run_label(path),
        summary=scalar_summary(path),
        lds=read_lds(path),
        points=read_points(path),
        weight_step=read_weight_step(path),
        tables=other_tables(path),
        scores_path=scores if isinstance(scores, str) else None,
        bank_key=key,
        bank_label=bank_label,
    )
    if report.lds and not report.points:
        report.notes.append("validation.csv is missing: no predicted-vs-actual plot")
    return report


@dataclass
class Comparison:
    """Validate runs that share their subsets: LDS per run and query."""

    label: str
    runs: list[ValidateReport]

    @property
    def queries(self) -> list[int]:
        return sorted({r.query for run in self.runs for r in run.lds_of()})

    def matrix(self) -> np.ndarray:
        """``[runs, queries]`` Spearman (NaN where a run has no such query)."""
        qs = self.queries
        out = np.full((len(self.runs), len(qs)), np.nan)
        for i, run in enumerate(self.runs):
            for r in run.lds_of():
                out[i, qs.index(r.query)] = r.spearman
        return out


def compare(reports: list[ValidateReport]) -> list[Comparison]:
    """Groups of at least two LDS runs with the same bank key, in the order given."""
    groups: dict[str, list[ValidateReport]] = {}
    for rep in reports:
        if rep.bank_key and rep.lds:
            groups.setdefault(rep.bank_key, []).append(rep)
    return [Comparison(g[0].bank_label, g) for g in groups.values() if len(g) > 1]
