"""The query actor's state and logic, without Ray: store metadata, the query-side
transform, the model (optional) and document text.

The actor only adds the Ray parts: shard handles, the fan-out and micro-batching.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from ..config import ServeConfig
from .documents import DocumentLookup
from .faiss_index import Hits, check_k, check_queries, configure_faiss
from .query_grads import QueryGradientMaker, normalize_queries
from .results import QueryResult, to_results
from .store_spec import open_store_spec
from .transform import make_transforms

log = logging.getLogger(__name__)


class QueryFrontend:
    """Validates requests, makes and transforms query gradients, labels hits with text."""

    def __init__(self, cfg: ServeConfig, *, device: str = "cpu"):
        t0 = time.perf_counter()
        configure_faiss(cfg.faiss.threads)
        self.cfg = cfg
        self.spec = open_store_spec(cfg.store)
        _, self.query_transform = make_transforms(
            cfg.faiss, self.spec.grad_sizes, self.spec.preprocess
        )
        self.docs = DocumentLookup(self.spec, cfg.text_field)
        self.maker: QueryGradientMaker | None = None
        if cfg.load_model:
            self.maker = QueryGradientMaker(self.spec, model=cfg.model, device=device)
        self.started = time.time()
        self.load_seconds = time.perf_counter() - t0
        self.served = 0

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def num_rows(self) -> int:
        return self.spec.num_rows

    def check_k(self, k: int) -> int:
        return check_k(k, self.num_rows)

    def check_queries(self, queries: Any) -> list:
        if self.maker is None:
            from ..errors import BadInputError

            raise BadInputError(
                f"service {self.cfg.name!r} was started without a model (load_model=False): "
                "use query_gradients"
            )
        return normalize_queries(queries)

    def gradients(self, queries: list) -> np.ndarray:
        """Raw query gradients (blocking: runs the model)."""
        assert self.maker is not None
        return self.maker.compute(queries)

    def prepare(self, grads: np.ndarray) -> np.ndarray:
        """Validate raw gradients and apply the query-side transform."""
        return self.query_transform(check_queries(grads, self.dim))

    def results(self, hits: Hits, queries: list | None, reverse: bool) -> list[QueryResult]:
        self.served += hits.ids.shape[0]
        flat = hits.ids.reshape(-1)
        return to_results(
            hits,
            texts=self.docs.texts(flat),
            doc_ids=self.docs.doc_ids(flat),
            queries=queries,
            reverse=reverse,
        )

    def info(self) -> dict:
        return {
            "name": self.cfg.name,
            "store": str(self.spec.path),
            "rows": self.num_rows,
            "dim": self.dim,
            "faiss": dataclasses.asdict(self.cfg.faiss),
            "model": bool(self.maker),
            "uptime_s": round(time.time() - self.started, 1),
            "load_seconds": round(self.load_seconds, 2),
            "queries_served": self.served,
        }
