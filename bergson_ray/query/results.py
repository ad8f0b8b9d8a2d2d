"""Search hits as people and programs see them: ids, scores, document text; JSON or CSV.

The CSV columns are bergson's ``--record`` columns (``query, direction, result,
result_index, score``) so existing analysis scripts read ours unchanged.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from .faiss_index import Hits


@dataclass
class QueryResult:
    """The hits of one query, best first (most negative first for bottom-k)."""

    ids: list[int]
    """Global row ids in the store (= document ids unless the store is per-token)."""
    scores: list[float]
    texts: list[str | None] = field(default_factory=list)
    doc_ids: list[int] = field(default_factory=list)
    query: str | None = None
    direction: str = "top"

    def to_dict(self) -> dict:
        return asdict(self)

    def __len__(self) -> int:
        return len(self.ids)


def query_label(q) -> str | None:
    if q is None or isinstance(q, str):
        return q
    return f"{q[0]} -> {q[1]}"


def to_results(
    hits: Hits,
    *,
    texts: list[str | None] | None = None,
    doc_ids: np.ndarray | None = None,
    queries: list | None = None,
    reverse: bool = False,
) -> list[QueryResult]:
    """Split ``Hits`` per query, dropping missing hits (id -1). ``texts``/``doc_ids`` are
    flat, aligned with ``hits.ids.reshape(-1)``."""
    q, k = hits.ids.shape
    flat_docs = hits.ids.reshape(-1) if doc_ids is None else np.asarray(doc_ids).reshape(-1)
    out = []
    for i in range(q):
        sl = slice(i * k, (i + 1) * k)
        keep = hits.ids[i] >= 0
        out.append(
            QueryResult(
                ids=[int(x) for x in hits.ids[i][keep]],
                scores=[float(x) for x in hits.scores[i][keep]],
                texts=[t for t, m in zip(texts[sl], keep) if m] if texts is not None else [],
                doc_ids=[int(x) for x in flat_docs[sl][keep]],
                query=query_label(queries[i]) if queries is not None else None,
                direction="bottom" if reverse else "top",
            )
        )
    return out


def format_json(results: list[QueryResult]) -> str:
    return json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=2)


def format_csv(results: list[QueryResult]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["query", "direction", "result", "result_index", "score"])
    for r in results:
        for j, (i, s) in enumerate(zip(r.doc_ids or r.ids, r.scores)):
            text = r.texts[j] if j < len(r.texts) else None
            w.writerow([r.query or "", r.direction, text or "", i, f"{s:.6g}"])
    return buf.getvalue()


def format_text(results: list[QueryResult], width: int = 160) -> str:
    """Human-readable listing for the interactive prompt."""
    lines = []
    for r in results:
        lines.append(f"== {r.direction} {len(r)} for: {r.query or '<gradient>'}")
        for j, (i, s) in enumerate(zip(r.doc_ids or r.ids, r.scores)):
            text = (r.texts[j] if j < len(r.texts) else None) or ""
            text = " ".join(text.split())
            if len(text) > width:
                text = text[: width - 3] + "..."
            lines.append(f"{j + 1:>3}. [{i}] {s:+.4g}  {text}")
    return "\n".join(lines)
