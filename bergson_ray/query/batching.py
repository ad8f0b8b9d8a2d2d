"""Micro-batching of concurrent requests into one model pass (pure asyncio).

The query actor receives many small requests at once; a transformer forward/backward
over 16 short texts costs little more than over one. ``MicroBatcher`` queues the items
of every request, and a single worker drains up to ``max_batch`` items (waiting at most
``wait_ms`` for more after the first arrives), runs the blocking function in a thread so
the event loop keeps accepting requests, and hands each request its own slice back.
One request's items always stay together, so a failure (bad text) fails that request
alone: the batch is retried item group by item group.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class MicroBatcher:
    """``await submit(items) -> fn(items)`` with concurrent submits fused into one call.

    ``fn(list) -> np.ndarray`` with one row per item (the query gradients).
    """

    def __init__(
        self,
        fn: Callable[[list[Any]], np.ndarray],
        *,
        max_batch: int = 32,
        wait_ms: float = 5.0,
    ):
        self.fn = fn
        self.max_batch = max(1, int(max_batch))
        self.wait_s = max(0.0, float(wait_ms)) / 1000.0
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="query-model")
        self.batches = 0
        self.items = 0

    async def submit(self, items: Sequence[Any]) -> np.ndarray:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((list(items), fut))
        return await fut

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            group = [await self._queue.get()]
            size = len(group[0][0])
            deadline = loop.time() + self.wait_s
            while size < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    nxt = (
                        self._queue.get_nowait()
                        if timeout <= 0
                        else await asyncio.wait_for(self._queue.get(), timeout)
                    )
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                group.append(nxt)
                size += len(nxt[0])
            await self._process(group, loop)

    async def _process(self, group: list, loop) -> None:
        items = [it for its, _ in group for it in its]
        try:
            rows = await loop.run_in_executor(self._pool, self.fn, items)
        except Exception as err:  # noqa: BLE001 - find the request at fault, fail only it
            if len(group) == 1:
                if not group[0][1].done():
                    group[0][1].set_exception(err)
                return
            for g in group:
                await self._process([g], loop)
            return
        self.batches += 1
        self.items += len(items)
        start = 0
        for its, fut in group:
            if not fut.done():
                fut.set_result(rows[start : start + len(its)])
            start += len(its)
