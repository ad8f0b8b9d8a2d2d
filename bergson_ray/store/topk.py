"""``top_k.parquet``: per query column, the best and worst scoring rows and their text.

One streaming scan (memory flat in the number of rows), used by ``score --top_k`` on its
own score file and by anyone holding a score matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from bergson_ray.errors import BadInputError

TOPK_PARQUET = "top_k.parquet"

COLUMNS = ("query", "rank", "direction", "row", "score", "text")


class Ranked(NamedTuple):
    """One query column's best rows (``top``) and worst rows (``bottom``), best first."""

    top: np.ndarray
    top_scores: np.ndarray
    bottom: np.ndarray
    bottom_scores: np.ndarray


def streaming_topk(scores: Any, k: int, bottom_k: int, chunk: int = 1 << 16) -> list[Ranked]:
    """Row ids of the ``k`` highest / ``bottom_k`` lowest scores of each column.

    ``scores`` is anything ``[rows, queries]`` with a ``shape`` whose row slices read as
    float32 arrays (a numpy array, a memmap, a score file's column view); it is read
    ``chunk`` rows at a time. NaN scores are never ranked; ties go to the lower row.
    """
    n, q = scores.shape
    empty_ids, empty_vals = np.zeros(0, np.int64), np.zeros(0, np.float32)
    kept = [[(empty_ids, empty_vals), (empty_ids, empty_vals)] for _ in range(q)]
    for lo in range(0, n, chunk):
        block = np.asarray(scores[lo : lo + chunk], dtype=np.float32)
        ids = np.arange(lo, lo + len(block), dtype=np.int64)
        for j in range(q):
            col = block[:, j]
            valid = ~np.isnan(col)
            for side, (keep, largest) in enumerate(((k, True), (bottom_k, False))):
                if keep <= 0:
                    continue
                have_ids, have_vals = kept[j][side]
                v = np.concatenate([have_vals, col[valid]])
                i = np.concatenate([have_ids, ids[valid]])
                # stable: earlier rows (kept ones come first) win ties
                order = np.argsort(-v if largest else v, kind="stable")[:keep]
                kept[j][side] = (i[order], v[order])
    return [Ranked(t[0], t[1], b[0], b[1]) for t, b in kept]


def write_topk_parquet(
    path: str | Path,
    scores: Any,
    k: int,
    bottom_k: int = 0,
    texts: Sequence[str] | Callable[[int], str] | None = None,
    *,
    row_ids: np.ndarray | None = None,
) -> Path:
    """Per query column, the ``k`` highest-scoring rows (``direction="top"``) and the
    ``bottom_k`` lowest (``"bottom"``) as Parquet: ``query, rank, direction, row, score, text``.

    ``rank`` starts at 1 for the best row of each direction. ``scores`` is ``[rows,
    queries]`` (see :func:`streaming_topk`; a tensor or a 1-D array is fine too). The text
    of store row ``r`` is ``texts[r]`` or ``texts(r)`` (``""`` without texts); ``row``
    reports ``row_ids[r]`` when given (candidate subsets).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    elif not hasattr(scores, "shape"):
        scores = np.asarray(scores, dtype=np.float32)
    if len(scores.shape) == 1:
        scores = np.asarray(scores, dtype=np.float32)[:, None]
    if len(scores.shape) != 2:
        raise BadInputError(f"scores must be [rows, queries], got shape {list(scores.shape)}")
    if k < 0 or bottom_k < 0:
        raise BadInputError(f"k and bottom_k must be >= 0, got {k}, {bottom_k}")
    if texts is not None and not callable(texts) and len(texts) != scores.shape[0]:
        raise BadInputError(f"{len(texts)} texts for {scores.shape[0]} score rows")
    text_of = texts if callable(texts) else None if texts is None else (lambda r: str(texts[r]))
    out: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    for q, ranked in enumerate(streaming_topk(scores, k, bottom_k)):
        for direction, ids, vals in (
            ("top", ranked.top, ranked.top_scores),
            ("bottom", ranked.bottom, ranked.bottom_scores),
        ):
            for rank, (r, s) in enumerate(zip(ids.tolist(), vals.tolist()), start=1):
                out["query"].append(q)
                out["rank"].append(rank)
                out["direction"].append(direction)
                out["row"].append(int(row_ids[r]) if row_ids is not None else r)
                out["score"].append(s)
                out["text"].append(text_of(r) if text_of else "")
    schema = pa.schema(
        [
            ("query", pa.int64()),
            ("rank", pa.int64()),
            ("direction", pa.string()),
            ("row", pa.int64()),
            ("score", pa.float64()),
            ("text", pa.string()),
        ]
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(out, schema=schema), path)
    return path
