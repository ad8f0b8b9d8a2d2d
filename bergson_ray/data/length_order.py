"""Give the workers documents of similar length together.

A worker packs the rows of one window (``--window_size``) into token-budget batches,
longest first (``data/batching.py``). Windows cut from the dataset's own order mix
short and long documents, so each window's batches pad short documents up to long
ones and break into more, smaller passes than bergson's sort over the whole set: on
1000 short documents of the tiny corpus, 127 batches and 55.9k padded tokens against
bergson's 104 and 48.8k. Handing out the rows longest text first gives every window a
narrow range of lengths, and the packing comes close to a global sort without
tokenizing anything in the driver. The lengths are the texts' UTF-8 byte counts, read
from the Arrow columns' offsets alone: the text itself is never read, so ordering a
corpus of any size costs a few bytes of I/O per row.

Rows are written at their own index, so the order they are computed in changes no
row's place; it only changes which documents share a padded batch.

Pure data code: no Ray, no model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from bergson_ray.config import DataConfig

if TYPE_CHECKING:
    from bergson_ray.data.row_plan import RowPlan

READ_ROWS = 65_536
"""Rows per Arrow slice while counting (bounded memory on any corpus)."""


def text_lengths(ds, cfg: DataConfig) -> np.ndarray | None:
    """UTF-8 bytes of each row's text (prompt plus completion), or None when they cannot
    be read cheaply: chat conversations (a template decides what is tokenized) and
    columns that are not plain strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if cfg.conversation_column:
        return None
    cols = [c for c in (cfg.prompt_column, cfg.completion_column) if c]
    if not cols or any(c not in ds.column_names for c in cols):
        return None
    arrow = ds.select_columns(cols).with_format("arrow")  # no other column is sliced
    total = np.zeros(len(ds), dtype=np.int64)
    for start in range(0, len(ds), READ_ROWS):
        table = arrow[start : start + READ_ROWS]
        for col in cols:
            values = table.column(col)
            if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                return None
            nbytes = pc.fill_null(pc.binary_length(values), 0)  # from the offsets only
            total[start : start + len(table)] += nbytes.to_numpy()
    return total


def longest_first(ds, rows: np.ndarray, cfg: DataConfig, plan: RowPlan | None = None) -> np.ndarray:
    """``rows`` (dataset rows) reordered longest text first, ties in their order.

    Unchanged when :func:`text_lengths` cannot count, or with a row plan
    (``--chunk_length``/``--max_tokens``: store rows are not dataset rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    if plan is not None or len(rows) < 2:
        return rows
    lengths = text_lengths(ds, cfg)
    if lengths is None:
        return rows
    return rows[np.argsort(-lengths[rows], kind="stable")]
