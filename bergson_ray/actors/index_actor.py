"""Index-shard actor: one FAISS shard of a store, held in a (detached, named) Ray actor.

Thin on purpose: :class:`~bergson_ray.query.shard.IndexShard` does the work. Built
shards are saved next to the store, so when Ray restarts a crashed actor
(``max_restarts``) the constructor simply loads the saved file again; ``search`` is
idempotent, so Ray may retry a call that was in flight (``max_task_retries``).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import ray

from ..config import FaissConfig
from ..query.faiss_index import Hits

log = logging.getLogger(__name__)


@ray.remote
class IndexShardActor:
    def __init__(self, store_path: str, faiss_cfg: FaissConfig, shard_id: int):
        from ..query.shard import IndexShard

        logging.basicConfig(level=logging.INFO)
        self.shard = IndexShard(store_path, faiss_cfg, shard_id)

    def search(self, queries: np.ndarray, k: int, reverse: bool = False) -> Hits:
        return self.shard.search(queries, k, reverse)

    def info(self) -> dict:
        return {
            **self.shard.info(),
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
        }

    def ping(self) -> bool:
        return True
