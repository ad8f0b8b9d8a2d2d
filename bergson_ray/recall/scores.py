"""A score directory (ours or bergson's) as recall reads it: one oriented column per query.

Both tools write the same ``scores.bin`` + ``info.json`` layout, read here with
:class:`~bergson_ray.store.score_store.ScoreStore`. Orientation follows bergson's rule:
an explicit ``--higher_is_better`` wins, else ``score_cfg.higher_is_better`` from the
``config.yaml`` beside the scores, else higher is better. Columns come out so that
higher always means "ranks first", a block at a time (a large store never sits in
memory as a whole, and is read in a few sequential passes, not one per column).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import recfunctions as rfn

from ..errors import BadInputError, StoreError
from ..store.elements import to_float32
from ..store.score_store import ScoreStore

BLOCK_BYTES = 256 << 20
"""Memory for one block of float32 score columns."""
ROW_CHUNK = 8192
"""Records read at a time while filling a block."""


@dataclass
class RecallScores:
    """An open score store with the orientation recall ranks it by."""

    store: ScoreStore
    higher_is_better: bool
    orientation_source: str
    """Where the orientation came from: ``--higher_is_better``, ``config.yaml`` or ``default``."""

    @property
    def num_rows(self) -> int:
        return self.store.num_rows

    @property
    def num_queries(self) -> int:
        return self.store.num_scores

    def is_complete(self) -> bool:
        return self.store.is_complete()

    def columns(
        self, block_bytes: int = BLOCK_BYTES, row_chunk: int = ROW_CHUNK
    ) -> Iterator[np.ndarray]:
        """float64 score column of each query in turn, negated when lower is better.

        ``scores.bin`` is row-major (one record of every query's score per row), so one
        column is a strided read through the whole file. Columns are therefore read in
        blocks of as many as fit ``block_bytes`` as float32, each block in one sequential
        pass over the rows, ``row_chunk`` records at a time.
        """
        n, q = self.num_rows, self.num_queries
        width = max(1, min(q, block_bytes // max(1, 4 * n)))
        for c0 in range(0, q, width):
            names = [f"score_{c}" for c in range(c0, min(q, c0 + width))]
            block = np.empty((len(names), n), dtype=np.float32)
            for r0 in range(0, n, row_chunk):
                part = rfn.structured_to_unstructured(self.store.mm[r0 : r0 + row_chunk][names])
                block[:, r0 : r0 + len(part)] = to_float32(part, self.store.element).numpy().T
            for j in range(len(names)):
                yield self._oriented(block[j], c0 + j)

    def _oriented(self, raw: np.ndarray, q: int) -> np.ndarray:
        col = raw.astype(np.float64)
        if np.isnan(col).any():
            raise BadInputError(
                f"--scores {self.store.path} has NaN scores in column {q}; they cannot be ranked"
            )
        return col if self.higher_is_better else -col


def open_scores(path: str | Path, higher_is_better: bool | None = None) -> RecallScores:
    """Open ``path`` for recall: one row per document (not per token), every row in order."""
    try:
        store = ScoreStore.open(path)
    except StoreError as err:
        raise BadInputError(f"--scores: {err}") from err
    if store.attribute_tokens:
        raise BadInputError(
            f"--scores {path} holds per-token scores; recall needs one row per statement"
        )
    if store.candidates is not None and not np.array_equal(
        store.row_ids, np.arange(store.num_rows)
    ):
        raise BadInputError(
            f"--scores {path} scores only some training rows (candidates.npy); recall needs "
            "every statement scored"
        )
    if higher_is_better is not None:
        return RecallScores(store, bool(higher_is_better), "--higher_is_better")
    recorded = store.higher_is_better
    if recorded is None:
        return RecallScores(store, True, "default")
    return RecallScores(store, bool(recorded), "config.yaml")


def check_shape(
    scores: RecallScores, num_statements: int, num_questions: int, statements: str, questions: str
) -> None:
    """One row per statement and one column per question, or one sentence saying which not."""
    src = scores.store.path
    if scores.num_rows != num_statements:
        raise BadInputError(
            f"--scores {src} has {scores.num_rows} rows but {statements} has {num_statements} "
            "statements; score the statements dataset of the same --num_people/--seed"
        )
    if scores.num_queries != num_questions:
        raise BadInputError(
            f"--scores {src} has {scores.num_queries} query columns but {questions} has "
            f"{num_questions} questions; build the query store from that questions dataset "
            "with one row per question (--aggregation none)"
        )


__all__ = ["RecallScores", "check_shape", "open_scores"]
