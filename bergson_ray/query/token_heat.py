"""Per-token heat maps for per-token stores (``--attribute_tokens``): which tokens of a
matched document carry its influence on a query.

A per-token store has one row per position ``s`` of a document (``s + 1 < L``, see
``gradients.losses.collection_mask``): the gradient of the loss that predicts token
``s + 1``. So the score of row ``offsets[d] + s`` belongs to token ``s + 1`` of
document ``d``; token 0 predicts nothing from inside the document and has no score.

Every row of a matched document is scored against the query exactly as the index scores
it (the index-side transform on the row, the already prepared query), so with a ``Flat``
index a hit's heat equals its search score; with an approximate index the heat is the
exact score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

from ..config import FaissConfig
from .results import QueryResult
from .rows import StoreRows
from .store_spec import StoreSpec
from .transform import make_transforms

log = logging.getLogger(__name__)

MAX_TOKENS = 400
"""Tokens shown per document: a window around its best hit when the document is longer."""


class TokenHeat:
    """Scores every token row of the documents a query matched, with the tokens' text."""

    def __init__(
        self,
        spec: StoreSpec,
        faiss: FaissConfig,
        tokenize: Callable[[np.ndarray], list],
        decode: Callable[[int], str],
        *,
        max_tokens: int = MAX_TOKENS,
    ):
        offsets = getattr(spec.store, "offsets", None)
        if offsets is None:
            raise ValueError(f"{spec.path} is not a per-token store")
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.rows = StoreRows(spec.store)
        self.index_transform, _ = make_transforms(faiss, spec.grad_sizes, spec.preprocess)
        self.tokenize = tokenize
        self.decode = decode
        self.max_tokens = max_tokens
        data = spec.build.data if spec.build is not None else None
        # chunked or --max_tokens stores: a row's item is not one tokenized dataset row
        self.whole_documents = data is not None and not (data.chunk_length or data.max_tokens)

    def documents(self, prepared: np.ndarray, results: list[QueryResult]) -> list[list[dict]]:
        """Per query, one entry per distinct matched document (in hit order).

        Each entry: ``doc_id``, ``start`` (index of the first token shown), ``tokens``
        (their text), ``scores`` (aligned with ``tokens``; ``None`` where a token has no
        row) and ``hits`` (indices into ``tokens`` of the query's hits).
        """
        if not self.whole_documents:
            return [[] for _ in results]
        out = []
        for q, res in zip(np.asarray(prepared, dtype=np.float32), results):
            hit_tokens: dict[int, list[int]] = {}
            for row, doc in zip(res.ids, res.doc_ids):
                hit_tokens.setdefault(int(doc), []).append(int(row) - int(self.offsets[doc]) + 1)
            docs = []
            for doc, hits in hit_tokens.items():
                entry = self._document(q, doc, hits)
                if entry is not None:
                    docs.append(entry)
            out.append(docs)
        return out

    def _document(self, query: np.ndarray, doc: int, hits: list[int]) -> dict | None:
        lo, hi = int(self.offsets[doc]), int(self.offsets[doc + 1])
        try:
            ids = list(self.tokenize(np.array([doc]))[0].input_ids)
        except Exception as err:  # noqa: BLE001 - a heat map is a nicety; never fail the query
            log.warning("no heat map for document %d: %s", doc, err)
            return None
        if len(ids) - 1 != hi - lo:  # tokenized otherwise than at build time
            log.warning(
                "no heat map for document %d: %d tokens but %d rows", doc, len(ids), hi - lo
            )
            return None
        start = 0
        if len(ids) > self.max_tokens:  # centre the window on the best hit
            start = min(max(max(hits) - self.max_tokens // 2, 0), len(ids) - self.max_tokens)
        stop = min(len(ids), start + self.max_tokens)
        first_row = max(start - 1, 0)  # token t's row is t - 1
        rows = self.rows.take(np.arange(lo + first_row, lo + stop - 1))
        scores = self.index_transform(rows) @ query
        by_token: list[float | None] = [None] * (stop - start)
        for j, s in enumerate(scores.tolist()):
            t = first_row + j + 1 - start
            by_token[t] = s if math.isfinite(s) else None
        return {
            "doc_id": int(doc),
            "start": start,
            "tokens": [self.decode(int(i)) for i in ids[start:stop]],
            "scores": by_token,
            "hits": sorted({h - start for h in hits if start <= h < stop}),
        }
