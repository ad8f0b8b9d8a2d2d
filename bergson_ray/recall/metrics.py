"""MRR and Recall@k of attribution scores against known source documents (pure numpy).

For a query ``q`` with score column ``s`` (one score per training document, higher =
stronger proponent) and gold documents ``G`` (every paraphrase of the fact it asks for),
each gold row ``g`` gets the rank bergson gives it: the rows scoring strictly higher,
plus the rows tying with it that come earlier in the dataset, plus one,

    rank(g) = #{i : s_i > s_g} + #{i < g : s_i = s_g} + 1,

i.e. its position in a stable descending sort. Per query, with ``r = min_g rank(g)``:

* reciprocal rank ``1 / r`` (MRR is its mean over queries);
* hit@k ``[r <= k]`` (Recall@k is its mean: *some* paraphrase made the top k);
* strict recall@k ``#{g : rank(g) <= k} / |G|`` (how many of the paraphrases did).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import BadInputError


def check_k(k: int) -> int:
    """``k`` as an int >= 1, or one sentence saying why not."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise BadInputError(f"-k must be a whole number >= 1, got {k!r}")
    return int(k)


def gold_ranks(column: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """1-based ranks of the rows ``gold`` in ``column`` sorted descending, ties broken by
    row order (bergson's rule)."""
    col = np.asarray(column)
    gold = np.asarray(gold, dtype=np.int64)
    vals = col[gold][:, None]
    higher = (col[None, :] > vals).sum(axis=1)
    earlier = np.arange(col.shape[0])[None, :] < gold[:, None]
    tied_before = ((col[None, :] == vals) & earlier).sum(axis=1)
    return (higher + tied_before + 1).astype(np.int64)


@dataclass(frozen=True)
class RecallResult:
    """Per-query ranks and the metrics averaged over queries."""

    k: int
    first_rank: np.ndarray
    """int64 ``[Q]``: the best rank of any gold document."""
    strict_recall: np.ndarray
    """float64 ``[Q]``: the fraction of gold documents ranked within k."""
    num_gold: np.ndarray
    """int64 ``[Q]``: how many gold documents each query has."""

    @property
    def num_queries(self) -> int:
        return int(self.first_rank.shape[0])

    @property
    def reciprocal_rank(self) -> np.ndarray:
        return 1.0 / self.first_rank.astype(np.float64)

    @property
    def hits(self) -> np.ndarray:
        """int64 ``[Q]``: 1 where some gold document is in the top k."""
        return (self.first_rank <= self.k).astype(np.int64)

    @property
    def mrr(self) -> float:
        return float(self.reciprocal_rank.mean())

    @property
    def recall_at_k(self) -> float:
        return float(self.hits.mean())

    @property
    def strict_recall_at_k(self) -> float:
        return float(self.strict_recall.mean())

    def metrics(self) -> dict[str, float]:
        """``{"mrr", "recall_at_<k>", "strict_recall_at_<k>"}`` (bergson's return value)."""
        return {
            "mrr": self.mrr,
            f"recall_at_{self.k}": self.recall_at_k,
            f"strict_recall_at_{self.k}": self.strict_recall_at_k,
        }


def evaluate(columns: Iterable[np.ndarray], gold: Sequence[np.ndarray], k: int) -> RecallResult:
    """Metrics of one score column per query (higher = better) against its gold rows.

    ``columns`` may be a generator, so a large store is read one column at a time.
    """
    k = check_k(k)
    first, strict, counts = [], [], []
    n_cols = 0
    for q, col in enumerate(columns):
        n_cols += 1
        if q >= len(gold):
            raise BadInputError(f"there are more score columns than the {len(gold)} queries")
        g = np.asarray(gold[q], dtype=np.int64)
        if g.size == 0:
            raise BadInputError(f"query {q} has no gold document to rank")
        if g.min() < 0 or g.max() >= len(col):
            raise BadInputError(
                f"query {q}'s gold documents reach row {int(g.max())} but there are "
                f"{len(col)} scored rows"
            )
        ranks = gold_ranks(col, g)
        first.append(int(ranks.min()))
        strict.append(float((ranks <= k).sum() / len(ranks)))
        counts.append(len(g))
    if n_cols != len(gold):
        raise BadInputError(f"there are {n_cols} score columns but {len(gold)} queries")
    if not n_cols:
        raise BadInputError("there are no queries to evaluate")
    return RecallResult(
        k=k,
        first_rank=np.asarray(first, dtype=np.int64),
        strict_recall=np.asarray(strict, dtype=np.float64),
        num_gold=np.asarray(counts, dtype=np.int64),
    )


def recall_metrics(
    scores: np.ndarray, gold: Sequence[np.ndarray], k: int, *, higher_is_better: bool = True
) -> RecallResult:
    """:func:`evaluate` of a dense ``[documents, queries]`` score matrix."""
    mat = np.asarray(scores, dtype=np.float64)
    if mat.ndim != 2:
        raise BadInputError(f"expected a [documents, queries] score matrix, got shape {mat.shape}")
    sign = 1.0 if higher_is_better else -1.0
    return evaluate((sign * mat[:, q] for q in range(mat.shape[1])), gold, k)


__all__ = ["RecallResult", "check_k", "evaluate", "gold_ranks", "recall_metrics"]
