"""``--auto_batch_size`` on one worker: probe the device with the heaviest batches of each
candidate token budget and keep the largest that fits (the search is ``data/batch_size.py``).

What a worker does, as bergson's ``build`` does before its first batch:

* on CPU nothing: there is no out-of-memory signal to search on (bergson's probe only
  catches CUDA's out-of-memory error, so on CPU it accepts every budget up to the ceiling,
  which only risks the host's memory). The worker keeps ``--token_batch_size`` and says so.
* on a GPU: every store row is tokenized once for its length; for a candidate budget the
  rows are packed as the worker packs them (per Ray Data window of ``--window_size`` rows)
  and the three heaviest batches (bergson's choice) run forward and backward through the
  engine under a 90 % memory cap; a CUDA out-of-memory error means "does not fit".

The found budget replaces ``--token_batch_size`` for this worker's packing only:
``--truncation`` keeps cutting documents at the budget the user gave (bergson truncates
while tokenizing, before it searches), so rows do not depend on the search.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from ..data.batch_size import largest_fitting_budget, probe_batches, search_ceiling


class Tunable(Protocol):
    """What the search needs of a :class:`~.gradient_runner.GradientRunner` (a protocol,
    so this module does not import the runner that calls it)."""

    spec: Any
    source: Any
    engine: Any

    def tokenize(self, idx: np.ndarray) -> list: ...

log = logging.getLogger(__name__)

PROBE_MEMORY_FRACTION = 0.9
"""Share of the GPU the probe batches may use, leaving room for the fragmentation a long
run builds up (bergson's figure)."""

TOKENIZE_BLOCK = 2048


def store_row_count(runner: Tunable) -> int:
    """Rows of the store the runner computes (a ``--chunk_length`` / ``--max_tokens`` plan's
    rows, else the dataset's)."""
    plan = runner.spec.rows
    return len(plan) if plan is not None else len(runner.source.dataset)


def row_lengths(runner: Tunable) -> list[int]:
    """Token count of every store row, tokenized as the worker tokenizes them."""
    n = store_row_count(runner)
    out: list[int] = []
    for lo in range(0, n, TOKENIZE_BLOCK):
        docs = runner.tokenize(np.arange(lo, min(lo + TOKENIZE_BLOCK, n)))
        out.extend(len(d.input_ids) for d in docs)
    return out


def gpu_probe(runner: Tunable, lengths: Sequence[int], window: int | None) -> Callable[[int], bool]:
    """``fits(budget)``: the budget's heaviest batches run on this worker's GPU."""
    from ..data.batching import collate

    device = torch.device(runner.engine.device)
    max_batch = runner.spec.batch.max_batch_size

    def fits(budget: int) -> bool:
        ok = True
        _release()
        torch.cuda.set_per_process_memory_fraction(PROBE_MEMORY_FRACTION, device)
        try:
            for positions in probe_batches(lengths, budget, max_batch, window):
                docs = [d for d in runner.tokenize(np.asarray(positions)) if len(d.input_ids) >= 2]
                if docs:
                    runner.engine.compute(collate(docs))
        except torch.cuda.OutOfMemoryError:
            ok = False
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            _release()
        log.info("--auto_batch_size: %d tokens %s", budget, "fit" if ok else "do not fit")
        return ok

    return fits


def tune_token_batch_size(
    runner: Tunable,
    *,
    window: int | None = None,
    fits: Callable[[int], bool] | None = None,
) -> int:
    """Set the runner's token budget by the search when ``--auto_batch_size`` is on; return
    the budget it packs with from now on.

    ``window``: rows per Ray Data batch (``--window_size``; None = all rows at once).
    ``fits``: the probe, injectable for tests; by default the GPU probe, and on CPU no
    search at all.
    """
    batch = runner.spec.batch
    if not getattr(batch, "auto_batch_size", False):
        return batch.token_batch_size
    device = torch.device(runner.engine.device)
    if fits is None and device.type != "cuda":
        log.info(
            "--auto_batch_size: no out-of-memory signal on %s, keeping --token_batch_size %d",
            device.type,
            batch.token_batch_size,
        )
        return batch.token_batch_size
    lengths = row_lengths(runner)
    ceiling = search_ceiling(lengths, window)
    probe = fits if fits is not None else gpu_probe(runner, lengths, window)
    found = largest_fitting_budget(lengths, probe, ceiling=ceiling)
    log.info("--auto_batch_size: token_batch_size %d (was %d)", found, batch.token_batch_size)
    runner.spec.batch = dataclasses.replace(batch, token_batch_size=found)
    return found


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
