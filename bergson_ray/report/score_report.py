"""What a score store's report shows, as plain data (no plotting, no HTML).

Per query column: the written scores (for the histogram), a few statistics, and the
``top`` highest and lowest scoring rows with their documents' text. Rows are ranked
by :func:`bergson_ray.store.topk.streaming_topk`, the same ranking ``score --top_k``
writes to ``top_k.parquet`` (unwritten cells are skipped; ties go to the lower row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..store.elements import to_float32
from ..store.files import read_yaml
from ..store.score_store import ScoreStore
from ..store.topk import streaming_topk
from .texts import RowTexts

SUMMARY_JSON = "summary.json"


@dataclass
class RankedRow:
    """One ranked store row: ``doc`` is its dataset row, ``token`` its position in that
    document for per-token stores (None otherwise)."""

    rank: int
    row: int
    doc: int
    token: int | None
    score: float
    text: str | None


@dataclass
class QueryScores:
    query: int
    values: np.ndarray
    """Written, non-NaN scores of this column (float32)."""
    top: list[RankedRow]
    bottom: list[RankedRow]

    @property
    def stats(self) -> dict[str, float]:
        v = self.values.astype(np.float64)
        if not len(v):
            return {"count": 0}
        return {
            "count": len(v), "mean": float(v.mean()), "std": float(v.std()),
            "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max()),
        }


@dataclass
class ScoreReport:
    path: Path
    command: str
    num_rows: int
    num_scores: int
    dtype: str
    per_token: bool
    higher_is_better: bool | None
    written_fraction: float
    queries: list[QueryScores]
    text_source: str
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def omitted_queries(self) -> int:
        return self.num_scores - len(self.queries)


def step_command(run_dir: Path) -> str | None:
    """The command that wrote ``run_dir`` (the first step of its ``config.yaml``)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        doc = read_yaml(path)
    except Exception:  # noqa: BLE001 - only a label
        return None
    steps = doc.get("steps") if isinstance(doc, dict) else None
    if isinstance(steps, list) and steps and isinstance(steps[0], dict) and steps[0]:
        return str(next(iter(steps[0])))
    return None


def scalar_summary(run_dir: Path) -> dict[str, Any]:
    """The scalar entries of ``summary.json`` (counts, timings), if there is one."""
    path = run_dir / SUMMARY_JSON
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: v for k, v in doc.items() if isinstance(v, (str, int, float, bool)) or v is None}


def _column(store: ScoreStore, j: int) -> np.ndarray:
    """Column ``j`` as float32 with unwritten cells as NaN (so they are never ranked)."""
    col = to_float32(store.mm[f"score_{j}"], store.element).numpy()
    col[~np.asarray(store.mm[f"written_{j}"], dtype=bool)] = np.nan
    return col


class _RowMap:
    """Store row -> (dataset row, token position)."""

    def __init__(self, store: ScoreStore):
        self.offsets = store.offsets
        cand = store.candidates
        self.candidates = None if cand is None else np.asarray(cand, dtype=np.int64)

    def __call__(self, row: int) -> tuple[int, int | None]:
        if self.offsets is None:
            doc = int(self.candidates[row]) if self.candidates is not None else row
            return doc, None
        item = int(np.searchsorted(self.offsets, row, side="right") - 1)
        token = row - int(self.offsets[item])
        if self.candidates is not None and item < len(self.candidates):
            item = int(self.candidates[item])
        return item, token


def score_report(path: str | Path, top: int = 10, max_queries: int = 16) -> ScoreReport:
    """Read score store ``path`` for a report: the first ``max_queries`` columns, each
    with its ``top`` highest and ``top`` lowest rows."""
    path = Path(path)
    store = ScoreStore.open(path)
    parent = path.parent if path.name == "scores" else None
    command = step_command(path) or "score"
    if parent is not None and (outer := step_command(parent)):
        command = f"{outer} ({path.name}/)"
    texts = RowTexts(path, [parent] if parent is not None else [])
    row_map = _RowMap(store)
    written = store.written
    queries = []
    for j in range(min(store.num_scores, max(max_queries, 0))):
        col = _column(store, j)
        (ranked,) = streaming_topk(col[:, None], top, top)
        sides = []
        for ids, vals in ((ranked.top, ranked.top_scores), (ranked.bottom, ranked.bottom_scores)):
            mapped = [row_map(int(r)) for r in ids]
            docs = [d for d, _ in mapped]
            shown = texts.texts(docs)
            sides.append([
                RankedRow(rank, int(r), d, t, float(s), txt)
                for rank, (r, s, (d, t), txt) in enumerate(zip(ids, vals, mapped, shown), start=1)
            ])
        queries.append(QueryScores(j, col[~np.isnan(col)], sides[0], sides[1]))
    return ScoreReport(
        path=path,
        command=command,
        num_rows=store.num_rows,
        num_scores=store.num_scores,
        dtype=store.element.name,
        per_token=store.attribute_tokens,
        higher_is_better=store.higher_is_better,
        written_fraction=float(written.mean()) if written.size else 0.0,
        queries=queries,
        text_source=texts.source,
        summary=scalar_summary(path),
    )
