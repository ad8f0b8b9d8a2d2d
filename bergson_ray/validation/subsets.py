"""Which documents each leave-k-out retrain drops, drawn exactly as bergson 2.5.1 draws them.

Drawing the same subsets from the same ``seed`` is what lets a bank retrained by bergson be
scored here (and ours by bergson): ``subsets.json`` row ``i`` lists the documents left out of
``retrained/subset_i``. So the draw mirrors bergson's use of torch's CPU generator call for
call (``torch.randperm`` on a ``torch.Generator`` seeded with ``seed``; the disjoint
partition is ``Tensor.chunk`` of one permutation, then shuffled with ``random.Random(seed)``).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInputError

SUBSETS_JSON = "subsets.json"


def pool_indices(flat_scores: np.ndarray, exclude_zero_scores: bool) -> np.ndarray:
    """Documents eligible for removal: all, or (``exclude_zero_scores``) those with a
    non-zero score in some column (bergson drops units too short to have a gradient)."""
    if exclude_zero_scores:
        return np.flatnonzero((flat_scores != 0).any(axis=1)).astype(np.int64)
    return np.arange(flat_scores.shape[0], dtype=np.int64)


def fraction_size(fraction: float, pool: int) -> int:
    """Documents per subset for a ``fraction`` draw (Python's round, at least one)."""
    return max(1, round(fraction * pool))


def draw_subsets(pool: np.ndarray, count: int, fraction: float, seed: int) -> list[np.ndarray]:
    """bergson's LDS subsets of ``pool``.

    ``fraction == 0``: one seeded permutation cut into ``count`` disjoint chunks of
    ``ceil(len / count)`` documents (so there can be fewer than ``count`` chunks, as with
    ``Tensor.chunk``), in a seeded random order so running correlations are unbiased.
    ``fraction > 0``: ``count`` independent draws of ``round(fraction * len)`` documents.
    """
    if count < 1:
        raise BadInputError(f"--count must be >= 1, got {count}")
    if not (fraction == 0 or 0 < fraction <= 1):
        raise BadInputError(f"--fraction must be 0 (disjoint partition) or in (0, 1], got {fraction}")
    n = len(pool)
    if fraction == 0 and count > n:
        raise BadInputError(f"--count {count} is larger than the {n} documents to partition")
    valid = torch.as_tensor(np.asarray(pool, dtype=np.int64))
    rng = torch.Generator().manual_seed(seed)
    if fraction > 0:
        k = fraction_size(fraction, n)
        return [valid[torch.randperm(n, generator=rng)[:k]].numpy() for _ in range(count)]
    perm = valid[torch.randperm(n, generator=rng)]
    chunks = list(perm.chunk(count))
    random.Random(seed).shuffle(chunks)
    return [c.numpy() for c in chunks]


def random_removals(pool: np.ndarray, k: int, count: int, seed: int) -> list[np.ndarray]:
    """bergson's random controls for ``--method filter``: ``count`` draws of ``k`` docs."""
    valid = torch.as_tensor(np.asarray(pool, dtype=np.int64))
    rng = torch.Generator().manual_seed(seed)
    return [valid[torch.randperm(len(valid), generator=rng)[:k]].numpy() for _ in range(count)]


def tail_removal(column: np.ndarray, pool: np.ndarray, k: int, direction: str) -> np.ndarray:
    """The ``k`` documents of ``pool`` at one end of a loss-signed score column.

    Loss-signed scores make proponents (upweighting them lowers the query loss) negative,
    so proponents are the smallest values and detractors the largest; ties go to torch's
    ``topk`` order, as in bergson.
    """
    if direction not in ("proponents", "detractors"):
        raise BadInputError(f"--direction must be proponents or detractors, got {direction!r}")
    col = torch.as_tensor(np.asarray(column, dtype=np.float32)[pool])
    chosen = torch.topk(col, min(k, len(col)), largest=direction == "detractors").indices
    return np.asarray(pool)[chosen.numpy()]


def save_subsets(path: str | Path, subsets: list[np.ndarray]) -> None:
    """Write ``subsets.json`` (one list of document ids per subset) atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps([[int(x) for x in s] for s in subsets]))
    os.replace(tmp, path)


def load_subsets(path: str | Path) -> list[np.ndarray]:
    """Read a ``subsets.json`` (ours or bergson's), checking its shape."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"subsets manifest {path} does not exist")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadInputError(f"subsets manifest {path} is not valid JSON: {err}") from err
    if not isinstance(rows, list) or not all(
        isinstance(r, list) and all(isinstance(x, int) and x >= 0 for x in r) for r in rows
    ):
        raise BadInputError(f"subsets manifest {path} must be a list of lists of document ids")
    if not rows:
        raise BadInputError(f"subsets manifest {path} lists no subsets")
    return [np.asarray(r, dtype=np.int64) for r in rows]


def same_subsets(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """Same subsets in the same order (document order inside a subset matters not)."""
    return len(a) == len(b) and all(
        np.array_equal(np.sort(x), np.sort(y)) for x, y in zip(a, b)
    )


def check_in_range(subsets: list[np.ndarray], num_docs: int, source: str) -> None:
    """Every listed document must exist in the training set."""
    top = max((int(s.max()) for s in subsets if len(s)), default=-1)
    if top >= num_docs:
        raise BadInputError(
            f"{source} lists document {top} but the training set has only {num_docs} documents"
        )
