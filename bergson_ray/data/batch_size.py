"""``--auto_batch_size``: the largest token budget whose batches fit on the device.

bergson's search, written against an injected ``fits(budget) -> bool`` so the search
itself is plain arithmetic (the caller decides what "fits" means: run the budget's
heaviest batches on the GPU and catch the out-of-memory error, or a test's threshold):

1. the longest document must fit alone (a smaller budget cannot split it), else stop;
2. double the budget until a budget does not fit or the ceiling is reached;
3. bisect between the last budget that fitted and the first that did not, until the gap
   is at most ``max(256, budget // 16)`` tokens (bergson's stopping rule: memory is not
   exact enough for a finer answer to be worth more probes).

The ceiling: never more than all the documents' tokens together, nor (when workers pack
windows of ``window`` rows) ``window`` times the longest document, since a larger budget
packs nothing differently. bergson also stops at the model's context length because it
refuses any ``token_batch_size`` above it; our budget packs several documents of at most
that length, so it may exceed it, and the search does not stop there.

Pure: no torch, no model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import BadInputError
from .batching import pack_by_token_budget

Fits = Callable[[int], bool]


def bergson_tolerance(budget: int) -> int:
    """How close the bisection gets before it stops (bergson: 256 tokens or 1/16)."""
    return max(256, budget // 16)


def search_ceiling(lengths: Sequence[int], window: int | None = None) -> int:
    """The largest budget worth probing: every token at most (``window`` x the longest
    document when rows are packed per window), the longest document at least."""
    longest = max(lengths)
    ceiling = sum(lengths)
    if window:
        ceiling = min(ceiling, window * longest)
    return max(longest, ceiling)


def largest_fitting_budget(
    lengths: Sequence[int],
    fits: Fits,
    *,
    ceiling: int,
    tolerance: Callable[[int], int] = bergson_tolerance,
) -> int:
    """The largest budget (to within ``tolerance``) for which ``fits`` holds.

    ``fits`` is assumed monotone (a budget that fits makes every smaller one fit). The
    answer always fitted when probed; the budget one tolerance step above it did not,
    unless the ceiling was reached.
    """
    if not lengths:
        raise BadInputError("--auto_batch_size needs at least one document")
    lo = max(int(n) for n in lengths)
    ceiling = max(lo, int(ceiling))
    if not fits(lo):
        raise BadInputError(
            f"--auto_batch_size: the longest document ({lo} tokens) does not fit in device "
            "memory even alone; use --truncation, a smaller --precision or more memory"
        )
    hi: int | None = None
    while lo < ceiling:
        candidate = min(2 * lo, ceiling)
        if not fits(candidate):
            hi = candidate
            break
        lo = candidate
    while hi is not None and hi - lo > tolerance(lo):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def probe_batches(
    lengths: Sequence[int],
    budget: int,
    max_batch_size: int | None = None,
    window: int | None = None,
) -> list[list[int]]:
    """The batches of ``budget`` most likely to run out of memory, as row positions.

    Workers pack each window of ``window`` consecutive rows (a Ray Data batch) on its
    own, so the batches are packed per window, then the three heaviest kept (bergson's
    three): the most padded tokens, the most documents and the most attention entries
    (documents x length^2). Duplicates are dropped.
    """
    n = len(lengths)
    step = window or n or 1
    batches: list[list[int]] = []
    for start in range(0, n, step):
        part = lengths[start : start + step]
        for b in pack_by_token_budget(part, budget, max_batch_size):
            batches.append([start + j for j in b])
    if not batches:
        return []

    def shape(b: list[int]) -> tuple[int, int]:
        return len(b), max(int(lengths[i]) for i in b)

    keys = (
        lambda b: shape(b)[0] * shape(b)[1],
        lambda b: shape(b)[0],
        lambda b: shape(b)[0] * shape(b)[1] ** 2,
    )
    out: list[list[int]] = []
    for key in keys:
        worst = max(batches, key=key)
        if worst not in out:
            out.append(worst)
    return out
