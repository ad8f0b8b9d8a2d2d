"""MicroBatcher (pure asyncio): concurrent requests share one model call; a bad request
fails alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bergson_ray.errors import BadInputError
from bergson_ray.query.batching import MicroBatcher


def fake_model(calls):
    def fn(items):
        calls.append(list(items))
        if any(i == "bad" for i in items):
            raise BadInputError("bad item")
        return np.array([[len(i)] for i in items], dtype=np.float32)

    return fn


def test_concurrent_requests_are_fused_and_split_back():
    calls: list = []
    b = MicroBatcher(fake_model(calls), max_batch=16, wait_ms=50)

    async def main():
        reqs = [["a"], ["bb", "ccc"], ["dddd"]]
        return await asyncio.gather(*[b.submit(r) for r in reqs])

    out = asyncio.run(main())
    assert [o[:, 0].tolist() for o in out] == [[1], [2, 3], [4]]
    assert len(calls) == 1 and b.batches == 1 and b.items == 4


def test_max_batch_caps_a_pass():
    calls: list = []
    b = MicroBatcher(fake_model(calls), max_batch=2, wait_ms=50)

    async def main():
        return await asyncio.gather(*[b.submit([str(i)]) for i in range(5)])

    asyncio.run(main())
    assert [len(c) for c in calls] == [2, 2, 1]


def test_a_bad_request_fails_alone():
    calls: list = []
    b = MicroBatcher(fake_model(calls), max_batch=16, wait_ms=50)

    async def main():
        return await asyncio.gather(
            b.submit(["ok"]), b.submit(["bad"]), b.submit(["fine"]), return_exceptions=True
        )

    good, bad, fine = asyncio.run(main())
    assert good[:, 0].tolist() == [2] and fine[:, 0].tolist() == [4]
    assert isinstance(bad, BadInputError)


def test_single_failure_is_raised_to_its_caller():
    b = MicroBatcher(fake_model([]), wait_ms=0)
    with pytest.raises(BadInputError):
        asyncio.run(b.submit(["bad"]))
