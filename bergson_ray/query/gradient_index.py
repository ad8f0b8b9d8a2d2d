"""An in-process, possibly sharded FAISS index over a gradient store's rows.

Used by the in-process :class:`~bergson_ray.query.attributor.Attributor`, by tests and
benchmarks; the service holds the very same shards in separate actors instead (one
:func:`~bergson_ray.query.index_store.open_shard` per actor) and merges with
:func:`~bergson_ray.query.faiss_index.merge_hits`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..config import FaissConfig
from .faiss_index import (
    ShardedIndex,
    build_shard,
    check_queries,
    configure_faiss,
    resolve_device,
    shard_bounds_remainder_last,
    to_gpu,
)
from .index_store import IndexDir, open_shard
from .rows import RowMatrix, as_row_matrix
from .transform import BuildPreprocess, RowTransform, make_transforms

log = logging.getLogger(__name__)


class GradientIndex:
    """FAISS over ``source`` rows with the index-side transform applied at build time.

    ``search`` takes *raw* query gradients (as the engine makes them) and applies the
    query-side transform (preconditioning, normalization) itself; ``search_prepared``
    takes queries that already went through :attr:`query_transform`.
    """

    def __init__(
        self,
        source: RowMatrix | np.ndarray,
        cfg: FaissConfig | None = None,
        *,
        store_path: str | Path | None = None,
        built: BuildPreprocess | None = None,
        grad_sizes: Mapping[str, int] | None = None,
    ):
        self.cfg = cfg or FaissConfig()
        self.source = as_row_matrix(source, grad_sizes)
        self.index_transform, self.query_transform = make_transforms(
            self.cfg, self.source.grad_sizes, built
        )
        configure_faiss(self.cfg.threads)
        self.index_dir: IndexDir | None = None
        if store_path is not None and self.cfg.save:
            index_dir = IndexDir(
                store_path,
                self.cfg,
                num_rows=self.source.num_rows,
                dim=self.source.dim,
                grad_sizes=self.source.grad_sizes,
            )
            if index_dir.prepare():
                self.index_dir = index_dir
        if self.index_dir is not None:
            bounds = self.index_dir.bounds
            shards = [
                open_shard(self.index_dir, i, self.source, self.index_transform)
                for i in range(len(bounds))
            ]
        else:
            bounds = shard_bounds_remainder_last(self.source.num_rows, self.cfg.num_shards)
            shards = [self._build_in_memory(lo, hi) for lo, hi in bounds]
        self.index = ShardedIndex(shards, [b[0] for b in bounds], nprobe=self.cfg.nprobe)

    def _build_in_memory(self, start: int, stop: int):
        device = resolve_device(self.cfg.device)
        index = build_shard(
            self.source,
            start,
            stop,
            factory=self.cfg.index_factory,
            transform=self.index_transform,
            max_train_examples=self.cfg.max_train_examples,
            batch_size=self.cfg.batch_size,
            device=device,
        )
        return to_gpu(index) if device == "cuda" else index

    @property
    def num_rows(self) -> int:
        return self.index.num_rows

    @property
    def dim(self) -> int:
        return self.index.dim

    def prepare_queries(self, queries: np.ndarray) -> np.ndarray:
        return self.query_transform(check_queries(queries, self.dim))

    def search(self, queries: np.ndarray, k: int, *, reverse: bool = False):
        """Top-k (bottom-k) rows for raw query gradients ``[Q, dim]`` -> ``Hits``."""
        return self.index.search(self.prepare_queries(queries), k, reverse=reverse)

    def search_prepared(self, queries: np.ndarray, k: int, *, reverse: bool = False):
        return self.index.search(queries, k, reverse=reverse)


__all__ = ["GradientIndex", "RowTransform"]
