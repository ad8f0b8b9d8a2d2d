"""The CSV files bergson's ``validate`` writes, with its names and columns, so tools that
read bergson's validation runs read ours."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from .lds import LdsResult

SUMMARY_COLUMNS = ["spearman_corr", "spearman_p", "pearson_corr", "pearson_p", "N", "baseline_loss"]
FILTER_COLUMNS = ["query", "n_removed", "baseline_loss", "filtered_loss", "loss_change"]
RANDOM_COLUMNS = ["subset", "query", "n_removed", "baseline_loss", "filtered_loss", "loss_change"]
FILTER_SUMMARY_COLUMNS = [
    "query", "n_removed", "filter_change", "random_mean", "random_sd", "random_n", "rank",
]


def write_csv(path: str | Path, columns: list[str], rows: list[list]) -> Path:
    """One header row, then ``rows``; floats as Python writes them (as bergson's do)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow([float(v) if isinstance(v, np.floating) else v for v in row])
    return path


def slice_names(start: int, stop: int, total: int) -> tuple[str, str]:
    """``validation.csv``/``summary.csv``, or ``_<start>_<stop>`` names for a slice."""
    if (start, stop) == (0, total):
        return "validation.csv", "summary.csv"
    return f"validation_{start}_{stop}.csv", f"summary_{start}_{stop}.csv"


def write_validation(path: str | Path, res: LdsResult, multi_query: bool) -> Path:
    """``validation.csv``: one row per subset (and query): ``diff`` and ``score_sum``."""
    rows: list[list] = []
    for row, sid in enumerate(res.subset_ids):
        if multi_query:
            for q in range(res.diffs.shape[1]):
                rows.append([sid, q, res.diffs[row, q], res.score_sums[row, q]])
        else:
            rows.append([sid, res.diffs[row, 0], res.score_sums[row, 0]])
    cols = ["subset", "query", "diff", "score_sum"] if multi_query else ["subset", "diff", "score_sum"]
    return write_csv(path, cols, rows)


def write_summary(path: str | Path, res: LdsResult, multi_query: bool, n: int) -> Path:
    """``summary.csv``: per query (multi-query) or one row: correlations, N, baseline."""
    rows = [
        [res.spearman[q].statistic, res.spearman[q].pvalue, res.pearson[q].statistic,
         res.pearson[q].pvalue, n, res.baseline[q]]
        for q in range(len(res.spearman))
    ]
    if multi_query:
        return write_csv(path, ["query", *SUMMARY_COLUMNS], [[q, *r] for q, r in enumerate(rows)])
    return write_csv(path, SUMMARY_COLUMNS, rows[:1])


def filter_summary_rows(
    filter_changes: np.ndarray, random_changes: np.ndarray, k: int
) -> list[list]:
    """Per query: the filter's loss change against the random removals' (rank 1 = the
    largest loss increase among the filter and the random removals)."""
    n = random_changes.shape[0]
    rows = []
    for q in range(len(filter_changes)):
        col = random_changes[:, q]
        rank = 1 + int((col > filter_changes[q]).sum())
        sd = float(np.std(col, ddof=1)) if n > 1 else math.nan
        rows.append([q, k, float(filter_changes[q]), float(col.mean()), sd, n, rank])
    return rows
