"""FAISS indexes over gradient rows: build in bounded memory, save, load, search, merge.

Pure FAISS/numpy; no Ray. One *shard* is one FAISS index over a contiguous row range of
the store; a :class:`ShardedIndex` searches several and merges their hits. The index
actors hold one shard each and the query actor merges with :func:`merge_hits`, so the
in-process and the distributed paths share every line of the search maths.

Conventions:

* every index uses ``METRIC_INNER_PRODUCT``; cosine = inner product of unit rows;
* ids returned are **global** row indices into the store; a missing hit (an IVF probe
  that found fewer than k rows) is id ``-1`` with score ``-inf`` (``+inf`` for bottom-k);
* bottom-k is top-k of the negated query, negated back: exact for ``Flat`` and the
  natural approximate counterpart for IVF/PQ/SQ (no scan of every row as bergson does);
* hits are ordered by score, ties by ascending id, so 1 and N shards agree exactly.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ..errors import BadInputError
from .rows import RowMatrix
from .transform import RowTransform

log = logging.getLogger(__name__)

BLAS_THRESHOLD = 16
"""FAISS scans sequentially below ``distance_compute_blas_threshold`` queries (default
128000 in 1.15), so a batch of 256 queries is no faster than 256 single ones. 16 lets
batches use BLAS (ray-on-2-cores.md §3: 2.3k vs 130 q/s for batches of 256)."""


def configure_faiss(threads: int = 1) -> None:
    """Process-wide FAISS settings for serving: OpenMP threads and the BLAS threshold."""
    faiss.omp_set_num_threads(max(1, int(threads)))
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and this process sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if gpu_available() else "cpu"
    if device == "cuda" and not gpu_available():
        raise BadInputError(
            "device='cuda' but FAISS has no GPU here (install faiss-gpu-cu12 in place of "
            "faiss-cpu, and run the index actor on a GPU node)"
        )
    if device not in ("cpu", "cuda"):
        raise BadInputError(f"device must be auto, cpu or cuda, got {device!r}")
    return device


def to_gpu(index: faiss.Index) -> faiss.Index:
    """Copy a CPU index onto the GPU(s) this process sees (one GPU: a plain copy)."""
    if faiss.get_num_gpus() == 1:
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, 0, index)
        gpu.bergson_resources = res  # keep the resources alive with the index
        return gpu
    return faiss.index_cpu_to_all_gpus(index)


def to_cpu(index: faiss.Index) -> faiss.Index:
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index


# ---------------------------------------------------------------------------- layout


def shard_bounds_remainder_last(num_rows: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous row ranges: ``num_rows // num_shards`` each, the remainder in the last
    (bergson's split, so its shard files line up with ours)."""
    if num_shards < 1:
        raise BadInputError(f"num_shards must be >= 1, got {num_shards}")
    size = num_rows // num_shards
    if size == 0:
        raise BadInputError(f"cannot split {num_rows} rows into {num_shards} shards")
    bounds = [(i * size, (i + 1) * size) for i in range(num_shards)]
    bounds[-1] = (bounds[-1][0], num_rows)
    return bounds


def make_index(dim: int, factory: str) -> faiss.Index:
    """``faiss.index_factory`` with the inner-product metric and a readable error."""
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise BadInputError(
            f"invalid FAISS index_factory {factory!r} for dim {dim} ({first}); examples: "
            "Flat, IVF1024,Flat, IVF256,SQfp16, PQ32, HNSW32"
        ) from None


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


def default_train_size(index: faiss.Index, shard_rows: int, max_train: int | None) -> int:
    """Rows used for training: the configured cap, else ``max(20k, 64 * nlist)``."""
    if max_train is not None:
        return max(1, min(shard_rows, int(max_train)))
    ivf = ivf_of(index)
    nlist = ivf.nlist if ivf is not None else 0
    return min(shard_rows, max(20_000, 64 * nlist))


def _check_trainable(index: faiss.Index, factory: str, n_train: int, shard_rows: int) -> None:
    ivf = ivf_of(index)
    if ivf is not None and n_train < ivf.nlist:
        raise BadInputError(
            f"index_factory {factory!r} has {ivf.nlist} IVF lists but a shard only has "
            f"{shard_rows} rows ({n_train} for training); use fewer lists (rule of thumb: "
            f"nlist ~ 4*sqrt(rows)) or fewer shards"
        )


def build_shard(
    source: RowMatrix,
    start: int,
    stop: int,
    *,
    factory: str,
    transform: RowTransform,
    max_train_examples: int | None = None,
    batch_size: int = 4096,
    device: str = "cpu",
) -> faiss.Index:
    """Build a CPU FAISS index over rows ``[start, stop)`` of ``source``.

    Rows are read, transformed and added ``batch_size`` at a time; training (IVF, PQ, SQ)
    uses an evenly strided sample so that a store sorted by topic still trains well.
    Peak memory: the index itself + the training sample + one batch.
    """
    n = stop - start
    t0 = time.perf_counter()
    index = make_index(source.dim, factory)
    on_gpu = resolve_device(device) == "cuda"
    if on_gpu:
        index = to_gpu(index)
    if not index.is_trained:
        n_train = default_train_size(index, n, max_train_examples)
        _check_trainable(index, factory, n_train, n)
        sample_idx = start + np.linspace(0, n - 1, n_train).round().astype(np.int64)
        sample_idx = np.unique(sample_idx)
        sample = np.concatenate(
            [
                transform(source.take(sample_idx[i : i + batch_size]))
                for i in range(0, len(sample_idx), batch_size)
            ]
        )
        try:
            index.train(sample)
        except RuntimeError as err:
            raise BadInputError(f"training FAISS index {factory!r} failed: {err}") from None
        del sample
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        index.add(transform(source.read(lo, hi)))
    if on_gpu:
        index = to_cpu(index)
    log.info("built %s over rows [%d, %d) in %.1fs", factory, start, stop, time.perf_counter() - t0)
    return index


def save_index(index: faiss.Index, path: str | Path) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half an index."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    faiss.write_index(to_cpu(index), str(tmp))
    os.replace(tmp, path)


def load_index(path: str | Path, *, mmap: bool = False, device: str = "cpu") -> faiss.Index:
    """Read a saved shard; ``mmap`` maps flat codes and inverted lists from disk (CPU)."""
    flags = 0
    if mmap:
        # MMAP_IFC maps flat codes *and* inverted lists; plain MMAP only inverted lists.
        # (OR-ing both breaks IVF reads in faiss 1.15.)
        flags = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP) | faiss.IO_FLAG_READ_ONLY
    index = faiss.read_index(str(path), flags)
    if resolve_device(device) == "cuda":
        if mmap:
            log.warning("mmap_index is ignored for a GPU index (it must be copied to the GPU)")
        index = to_gpu(index)
    return index


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set ``nprobe`` on IVF indexes (a no-op for the others)."""
    ivf = ivf_of(index)
    if ivf is None:
        return
    if nprobe < 1:
        raise BadInputError(f"nprobe must be >= 1, got {nprobe}")
    try:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
    except RuntimeError:  # GPU indexes take it through GpuParameterSpace
        if hasattr(faiss, "GpuParameterSpace"):
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
        else:
            raise


# ---------------------------------------------------------------------------- search


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """Validate and return queries as a C-contiguous float32 ``[Q, dim]`` array."""
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise BadInputError(f"query gradients must be [num_queries, dim], got shape {q.shape}")
    if q.shape[0] == 0:
        raise BadInputError("no query gradients given")
    if q.shape[1] != dim:
        raise BadInputError(
            f"query gradients have dim {q.shape[1]} but the index's rows have dim {dim} "
            "(was the query made with the store's model, modules and projection?)"
        )
    if not np.issubdtype(q.dtype, np.number):
        raise BadInputError(f"query gradients must be numeric, got dtype {q.dtype}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise BadInputError("query gradients contain NaN or inf")
    return q


def check_k(k: int, num_rows: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise BadInputError(f"k must be an integer, got {k!r}")
    if k <= 0:
        raise BadInputError(f"k must be >= 1, got {k}")
    if k > num_rows:
        raise BadInputError(f"k={k} is larger than the number of rows in the index ({num_rows})")
    return int(k)


@dataclass
class Hits:
    """Search results for Q queries: ``scores [Q, k]`` float32 and ``ids [Q, k]`` int64."""

    scores: np.ndarray
    ids: np.ndarray


def search_index(
    index: faiss.Index, queries: np.ndarray, k: int, *, offset: int = 0, reverse: bool = False
) -> Hits:
    """Top-k (or bottom-k) of one shard; ids shifted by ``offset`` to global rows."""
    k_eff = min(k, index.ntotal)
    q = -queries if reverse else queries
    scores, ids = index.search(q, k_eff)
    if reverse:
        scores = -scores
    missing = ids < 0
    ids = np.where(missing, -1, ids + offset).astype(np.int64)
    scores = np.where(missing, np.inf if reverse else -np.inf, scores).astype(np.float32)
    if k_eff < k:
        pad = k - k_eff
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.inf if reverse else -np.inf)
    return Hits(scores, ids)


def merge_hits(parts: list[Hits], k: int, *, reverse: bool = False) -> Hits:
    """Merge per-shard hits into the global top-k: by score, ties by id, missing last."""
    scores = np.concatenate([p.scores for p in parts], axis=1)
    ids = np.concatenate([p.ids for p in parts], axis=1)
    key = scores.astype(np.float64) if reverse else -scores.astype(np.float64)
    tie = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((tie, key), axis=1)[:, :k]
    return Hits(np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1))


class ShardedIndex:
    """Several shard indexes over consecutive row ranges, searched and merged in turn."""

    def __init__(self, shards: list[faiss.Index], offsets: list[int], *, nprobe: int = 10):
        if len(shards) != len(offsets) or not shards:
            raise ValueError("need one offset per shard and at least one shard")
        self.shards = shards
        self.offsets = offsets
        self.dim = int(shards[0].d)
        self.num_rows = int(sum(s.ntotal for s in shards))
        for s in shards:
            set_nprobe(s, nprobe)

    def set_nprobe(self, nprobe: int) -> None:
        for s in self.shards:
            set_nprobe(s, nprobe)

    def search(self, queries: np.ndarray, k: int, *, reverse: bool = False) -> Hits:
        """Top-k (bottom-k with ``reverse``) over all shards; queries already transformed."""
        q = check_queries(queries, self.dim)
        k = check_k(k, self.num_rows)
        parts = [
            search_index(s, q, k, offset=o, reverse=reverse)
            for s, o in zip(self.shards, self.offsets)
        ]
        return merge_hits(parts, k, reverse=reverse)


def factory_slug(factory: str) -> str:
    """``IVF1024,SQfp16`` -> ``IVF1024_SQfp16`` (safe as a directory name)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", factory.replace(",", "_"))
