"""Attribution scores as validation reads them: one loss-signed column per query.

Whatever wrote the scores, validation compares them with *loss changes*, so they are
turned into bergson's loss-signed convention first: negative = upweighting the document
lowers the query loss (a proponent). Score stores that record
``score_cfg.higher_is_better: true`` (ours and bergson's gradient scorers) are negated;
stores without it (MAGIC's metagradients, already d loss / d weight) are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInputError, StoreError


@dataclass
class LossSignedScores:
    """``matrix[n_docs, n_queries]`` (float64), loss-signed; ``negated`` records the flip."""

    matrix: np.ndarray
    negated: bool
    source: str

    @property
    def num_docs(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def num_queries(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def multi_query(self) -> bool:
        """bergson's switch: more than one column = one LDS per query document."""
        return self.num_queries > 1


def load_loss_signed(path: str | Path, higher_is_better: bool | None = None) -> LossSignedScores:
    """Open a score directory (ours or bergson's) and return loss-signed scores.

    ``higher_is_better`` overrides what the store's ``config.yaml`` says (None = read it).
    """
    from ..store.score_store import ScoreStore

    try:
        store = ScoreStore.open(path)
    except StoreError as err:
        raise BadInputError(f"--scores: {err}") from err
    if store.attribute_tokens:
        raise BadInputError(
            f"--scores {path} holds per-token scores; validate needs one row per document"
        )
    if not store.is_complete():
        missing = len(store.missing_rows())
        raise BadInputError(f"--scores {path} is incomplete: {missing} rows were never written")
    flip = store.higher_is_better if higher_is_better is None else higher_is_better
    matrix = store.scores.astype(np.float64)
    if flip:
        matrix = -matrix
    return LossSignedScores(matrix, bool(flip), str(path))


def check_scores(scores: LossSignedScores, num_train_docs: int, num_query_docs: int) -> None:
    """Scores must have one row per training document and, per query, one column."""
    if scores.num_docs != num_train_docs:
        raise BadInputError(
            f"--scores {scores.source} has {scores.num_docs} rows but the training set has "
            f"{num_train_docs} documents; score the same training set you validate on"
        )
    if scores.multi_query and scores.num_queries != num_query_docs:
        raise BadInputError(
            f"--scores {scores.source} has {scores.num_queries} query columns but the query "
            f"set has {num_query_docs} documents; per-query validation needs one column per "
            "query document"
        )
