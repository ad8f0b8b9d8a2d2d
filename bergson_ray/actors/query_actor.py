"""Query actor: the named entry point of a service.

It holds the model and the store's processor (through
:class:`~bergson_ray.query.frontend.QueryFrontend`), fuses concurrent text queries into
one model pass (:class:`~bergson_ray.query.batching.MicroBatcher`), sends the
transformed query gradients to every index shard at once and merges their hits.
An async actor, so slow model passes never block gradient-only requests or ``info``.

Errors in a request (bad text, bad k, wrong dim) raise ``BadInputError`` to that caller
only; the actor keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import numpy as np
import ray

from ..config import ServeConfig, shard_actor_name
from ..query.faiss_index import Hits, merge_hits
from ..query.results import QueryResult

log = logging.getLogger(__name__)


@ray.remote
class QueryActor:
    def __init__(self, cfg: ServeConfig):
        from ..query.batching import MicroBatcher
        from ..query.frontend import QueryFrontend

        logging.basicConfig(level=logging.INFO)
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.cfg = cfg
        self.front = QueryFrontend(cfg, device=device)
        self.batcher = MicroBatcher(
            self.front.gradients, max_batch=cfg.max_batch_size, wait_ms=cfg.batch_wait_ms
        )
        self._shards: list | None = None
        self._heat = None  # TokenHeat, made on the first heat-map request

    @property
    def shards(self) -> list:
        # Looked up lazily by name: a restarted shard keeps its name, so handles stay good.
        if self._shards is None:
            self._shards = [
                ray.get_actor(shard_actor_name(self.cfg.name, i), namespace=self.cfg.namespace)
                for i in range(self.cfg.faiss.num_shards)
            ]
        return self._shards

    async def _search(self, prepared: np.ndarray, k: int, reverse: bool) -> Hits:
        parts = await asyncio.gather(*[s.search.remote(prepared, k, reverse) for s in self.shards])
        return merge_hits(list(parts), k, reverse=reverse)

    async def _query(
        self, queries: Any, k: int, reverse: bool
    ) -> tuple[list[QueryResult], np.ndarray]:
        """Hits with text, and the prepared query rows they were searched with."""
        k = self.front.check_k(k)
        queries = self.front.check_queries(queries)
        grads = await self.batcher.submit(queries)
        prepared = self.front.prepare(grads)
        hits = await self._search(prepared, k, reverse)
        return self.front.results(hits, queries, reverse), prepared

    async def query(self, queries: Any, k: int = 10, reverse: bool = False) -> list[QueryResult]:
        """Texts or (prompt, completion) pairs -> top-k (bottom-k) hits with text."""
        return (await self._query(queries, k, reverse))[0]

    async def query_tokens(
        self, queries: Any, k: int = 10, reverse: bool = False
    ) -> tuple[list[QueryResult], list[list[dict]]]:
        """``query``, plus per query the per-token heat map of every matched document
        (``query.token_heat``; the web page draws it). Empty lists unless the store is
        per-token (``--attribute_tokens``)."""
        results, prepared = await self._query(queries, k, reverse)
        if getattr(self.front.spec.store, "offsets", None) is None:
            return results, [[] for _ in results]
        if self._heat is None:
            from ..query.token_heat import TokenHeat

            runner = self.front.maker.runner
            self._heat = TokenHeat(
                self.front.spec,
                self.cfg.faiss,
                runner.tokenize,
                lambda i: runner.tokenizer.decode([i]),
            )
        # on the model's own thread: a fast tokenizer must not be used by two threads at once
        heat = await asyncio.get_running_loop().run_in_executor(
            self.batcher._pool, self._heat.documents, prepared, results
        )
        return results, heat

    async def query_gradients(
        self, grads: np.ndarray, k: int = 10, reverse: bool = False
    ) -> list[QueryResult]:
        """Raw query gradients ``[Q, dim]`` (made like the store's rows) -> hits with text."""
        k = self.front.check_k(k)
        hits = await self._search(self.front.prepare(grads), k, reverse)
        return self.front.results(hits, None, reverse)

    async def gradients(self, queries: Any) -> np.ndarray:
        """The raw query gradients the service makes for ``queries`` (for debugging)."""
        return await self.batcher.submit(self.front.check_queries(queries))

    async def info(self) -> dict:
        shards = await asyncio.gather(*[s.info.remote() for s in self.shards])
        return {
            **self.front.info(),
            "namespace": self.cfg.namespace,
            "pid": os.getpid(),
            "shards": list(shards),
            "model_batches": self.batcher.batches,
            "http": self.cfg.http,
        }

    async def config(self) -> ServeConfig:
        return self.cfg

    async def ping(self) -> bool:
        return True
