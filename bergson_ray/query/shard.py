"""One index shard as a service holds it: open (load or build) and search.

Everything an index-shard actor does lives here, so the actor is a thin Ray wrapper and
the same object can be exercised in tests without Ray.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..config import FaissConfig
from .faiss_index import Hits, check_k, check_queries, configure_faiss, search_index, set_nprobe
from .index_store import IndexDir, open_shard
from .rows import StoreRows
from .store_spec import open_store_spec
from .transform import make_transforms

log = logging.getLogger(__name__)


class IndexShard:
    """Rows ``[start, stop)`` of a store in a FAISS index; searches return global ids."""

    def __init__(self, store_path: str | Path, cfg: FaissConfig, shard_id: int):
        t0 = time.perf_counter()
        configure_faiss(cfg.threads)
        spec = open_store_spec(store_path)
        index_tf, _ = make_transforms(cfg, spec.grad_sizes, spec.preprocess)
        index_dir = IndexDir(
            spec.path, cfg, num_rows=spec.num_rows, dim=spec.dim, grad_sizes=spec.grad_sizes
        )
        if not 0 <= shard_id < len(index_dir.bounds):
            raise ValueError(f"shard {shard_id} of {len(index_dir.bounds)}")
        self.loaded_from_disk = cfg.save and index_dir.has_shard(shard_id)
        self.index = open_shard(index_dir, shard_id, StoreRows(spec.store), index_tf)
        set_nprobe(self.index, cfg.nprobe)
        self.shard_id = shard_id
        self.start, self.stop = index_dir.bounds[shard_id]
        self.dim = spec.dim
        self.factory = cfg.index_factory
        self.open_seconds = time.perf_counter() - t0
        log.info(
            "shard %d: rows [%d, %d) %s in %.1fs",
            shard_id,
            self.start,
            self.stop,
            "loaded" if self.loaded_from_disk else "built",
            self.open_seconds,
        )

    def search(self, queries: np.ndarray, k: int, reverse: bool = False) -> Hits:
        """Queries must already be transformed (the query actor does that once)."""
        q = check_queries(queries, self.dim)
        return search_index(self.index, q, check_k(k, 1 << 62), offset=self.start, reverse=reverse)

    def info(self) -> dict:
        return {
            "shard": self.shard_id,
            "rows": [self.start, self.stop],
            "factory": self.factory,
            "loaded_from_disk": self.loaded_from_disk,
            "open_seconds": round(self.open_seconds, 3),
        }
