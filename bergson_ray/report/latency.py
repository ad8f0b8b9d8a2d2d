"""Query latency of a service, measured from the caller's side.

The service keeps no latency record (its ``info()`` counts queries and uptime only),
so the report times a few queries itself: each input ``repeats`` times, one after the
other, after one untimed warm-up call (the first query may load the model). Times
include the round trip through Ray, which is what a user of ``bergson_ray.connect()``
waits for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BadInputError

PERCENTILES = (50, 90, 95, 99)
DEFAULT_QUERIES = (
    "def read_file(path):\n    with open(path) as f:\n        return f.read()",
    "Return the sum of a list of numbers.",
    "import numpy as np\nx = np.zeros(10)",
)


@dataclass
class LatencyReport:
    name: str
    samples_ms: np.ndarray
    warmup_ms: float
    what: str
    """How the queries were made (text or raw gradients, k)."""
    info: dict[str, Any] = field(default_factory=dict)
    """The service's own ``info()`` (scalars only)."""

    @property
    def percentiles(self) -> dict[int, float]:
        return {p: float(np.percentile(self.samples_ms, p)) for p in PERCENTILES}

    @property
    def stats(self) -> dict[str, float]:
        s = self.samples_ms
        return {"count": len(s), "mean": float(s.mean()), "min": float(s.min()),
                "max": float(s.max())}


def measure(
    call: Callable[[Any], Any],
    inputs: Sequence[Any],
    repeats: int,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[np.ndarray, float]:
    """``(samples_ms, warmup_ms)``: ``call(x)`` timed for every input, ``repeats`` rounds,
    after one warm-up call with the first input (timed apart, not in the samples)."""
    if not inputs:
        raise BadInputError("latency needs at least one query")
    if repeats < 1:
        raise BadInputError(f"--repeats must be at least 1, got {repeats}")
    t0 = clock()
    call(inputs[0])
    warmup = (clock() - t0) * 1000.0
    samples = []
    for _ in range(repeats):
        for x in inputs:
            t0 = clock()
            call(x)
            samples.append((clock() - t0) * 1000.0)
    return np.asarray(samples, dtype=np.float64), warmup


def service_latency(
    client: Any, queries: Sequence[str], repeats: int, k: int = 10
) -> LatencyReport:
    """Time ``client.query`` (text; raw random gradients when the service has no model)
    on a :class:`~bergson_ray.query.client.ServiceClient` or anything with its methods."""
    info = client.info()
    if info.get("model", True):
        inputs: list[Any] = list(queries or DEFAULT_QUERIES)
        samples, warm = measure(lambda q: client.query([q], k=k), inputs, repeats)
        what = f"{len(inputs)} text queries x {repeats}, one at a time, k={k}"
    else:
        dim = int(info["dim"])
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal((1, dim)).astype(np.float32) for _ in range(3)]
        samples, warm = measure(lambda g: client.query_gradients(g, k=k), inputs, repeats)
        what = f"3 random query gradients x {repeats} (the service has no model), k={k}"
    try:
        info = client.info()  # now with the timed queries counted
    except Exception:  # noqa: BLE001 - the numbers are measured; the info is a label
        pass
    plain = {
        key: v for key, v in info.items()
        if isinstance(v, (str, int, float, bool)) or v is None
    }
    return LatencyReport(str(info.get("name", "service")), samples, warm, what, plain)
