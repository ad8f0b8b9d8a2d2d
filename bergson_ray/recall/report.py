"""What a recall run writes: bergson's ``recall.csv`` / ``summary.csv`` and a short table.

Same file names and columns as bergson's ``recall``, so anything that reads its runs
reads ours.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from .metrics import RecallResult


def _write(path: Path, columns: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(columns)
        out.writerows(rows)
    return path


def write_recall_csv(
    path: str | Path,
    result: RecallResult,
    identifiers: Sequence[int],
    fields: Sequence[str],
    answers: Sequence[str],
) -> Path:
    """``recall.csv``: one row per question with its best gold rank and hit."""
    k = result.k
    columns = [
        "question_idx", "identifier", "field", "answer", "first_gold_rank", "reciprocal_rank",
        f"hit_at_{k}", f"strict_recall_at_{k}", "num_gold",
    ]
    rr, hits = result.reciprocal_rank, result.hits
    rows = [
        [q, int(identifiers[q]), fields[q], answers[q], int(result.first_rank[q]), float(rr[q]),
         int(hits[q]), float(result.strict_recall[q]), int(result.num_gold[q])]
        for q in range(result.num_queries)
    ]
    return _write(Path(path), columns, rows)


def write_summary_csv(path: str | Path, result: RecallResult, num_people: int) -> Path:
    """``summary.csv``: MRR, Recall@k, strict Recall@k, N questions, people."""
    k = result.k
    columns = ["MRR", f"recall_at_{k}", f"strict_recall_at_{k}", "N", "num_people"]
    row = [result.mrr, result.recall_at_k, result.strict_recall_at_k, result.num_queries, num_people]
    return _write(Path(path), columns, [row])


def summary_of(result: RecallResult, num_statements: int, num_people: int) -> dict[str, float | int]:
    """The metrics and counts as one flat mapping (``summary.json``)."""
    return {
        **result.metrics(),
        "k": result.k,
        "num_questions": result.num_queries,
        "num_statements": num_statements,
        "num_people": num_people,
    }


def format_table(summary: dict) -> str:
    """A few aligned lines for the terminal, from :func:`summary_of`'s mapping."""
    k = summary["k"]
    lines = [
        ("MRR", f"{summary['mrr']:.4f}"),
        (f"Recall@{k}", f"{summary[f'recall_at_{k}']:.4f}"),
        (f"strict Recall@{k}", f"{summary[f'strict_recall_at_{k}']:.4f}"),
        ("questions", str(summary["num_questions"])),
        ("statements", str(summary["num_statements"])),
    ]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


__all__ = ["format_table", "summary_of", "write_recall_csv", "write_summary_csv"]
