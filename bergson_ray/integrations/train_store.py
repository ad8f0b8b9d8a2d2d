"""On-disk side of train-time gradient collection: shards, sums and atomic commits.

Every process (one per DDP rank) appends the rows it computed to its own shard in the
store's ``.part`` directory (``shard-<rank>.idx`` int64, ``shard-<rank>.rows`` float32).
When the store is due (an epoch's end, or the end of training with
``accumulate_grads``) rank 0 sums the shards into a float32 buffer at each row's dataset
index, writes a ``build``-format store (``GradientStoreWriter``, processor files and a
``build``-shaped ``config.yaml``) into the ``.part`` directory and renames it. So:

* a crash before the rename leaves only ``<name>.part``: nothing that looks complete;
* an example seen twice in one epoch (DDP's padding of the last batch repeats examples)
  gets the sum of its two updates, which is what it contributed, and with
  ``accumulate_grads`` each epoch adds into the same sum (no overwriting);
* several machines work if the path is on a file system they share.

No ``torch.distributed`` here: the callback owns the barriers.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..gradients.normalizers import Normalizer
from ..store.gradient_writer import GradientStoreWriter
from ..store.processor import NormalizerState, ProcessorConfig, save_processor

log = logging.getLogger(__name__)

SUM_F32 = "sum.f32"
SEEN_U8 = "seen.u8"
PART = ".part"


def part_of(final: Path) -> Path:
    return final.with_name(final.name + PART)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class RowShard:
    """One rank's append-only ``(index, row)`` records for one store."""

    def __init__(self, directory: Path, rank: int, dim: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self._idx = open(directory / f"shard-{rank}.idx", "ab")  # noqa: SIM115 - long-lived
        self._rows = open(directory / f"shard-{rank}.rows", "ab")  # noqa: SIM115

    def append(self, idx: np.ndarray, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.shape != (len(idx), self.dim):
            raise ValueError(f"rows {rows.shape} do not match {len(idx)} indices x {self.dim}")
        self._rows.write(rows.tobytes())
        self._idx.write(np.ascontiguousarray(idx, dtype=np.int64).tobytes())

    def close(self) -> None:
        for f in (self._rows, self._idx):
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()


def iter_shards(directory: Path, dim: int, chunk: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every shard's records in ``directory``, ``chunk`` rows at a time (memory-mapped)."""
    for idx_file in sorted(directory.glob("shard-*.idx")):
        rows_file = idx_file.with_suffix(".rows")
        n = idx_file.stat().st_size // 8
        if n == 0:
            continue
        if rows_file.stat().st_size != n * dim * 4:
            raise RuntimeError(f"{rows_file} does not hold {n} rows of {dim} floats")
        idx = np.memmap(idx_file, dtype=np.int64, mode="r", shape=(n,))
        rows = np.memmap(rows_file, dtype=np.float32, mode="r", shape=(n, dim))
        for lo in range(0, n, chunk):
            yield np.asarray(idx[lo : lo + chunk]), np.asarray(rows[lo : lo + chunk])


def drop_shards(directory: Path) -> None:
    for f in list(directory.glob("shard-*.idx")) + list(directory.glob("shard-*.rows")):
        f.unlink()


class SumBuffer:
    """Float32 ``[num_items, dim]`` running sum on disk, plus which items were seen."""

    def __init__(self, directory: Path, num_items: int, dim: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.shape = (num_items, dim)
        sum_path, seen_path = directory / SUM_F32, directory / SEEN_U8
        mode = "r+" if sum_path.exists() else "w+"
        if mode == "r+" and sum_path.stat().st_size != num_items * dim * 4:
            raise RuntimeError(f"{sum_path} has the wrong size for {num_items} x {dim}")
        self.sum = np.memmap(sum_path, dtype=np.float32, mode=mode, shape=self.shape)
        self.seen = np.memmap(seen_path, dtype=np.uint8, mode=mode, shape=(num_items,))

    def add(self, idx: np.ndarray, rows: np.ndarray) -> None:
        if len(idx) == 0:
            return
        if idx.min() < 0 or idx.max() >= self.shape[0]:
            raise RuntimeError(f"row index out of range [0, {self.shape[0]}): {idx.min()}..{idx.max()}")
        uniq, inv = np.unique(idx, return_inverse=True)
        summed = np.zeros((len(uniq), self.shape[1]), dtype=np.float32)
        np.add.at(summed, inv, rows)
        self.sum[uniq] += summed
        self.seen[uniq] = 1

    def add_shards(self, directory: Path) -> None:
        for idx, rows in iter_shards(directory, self.shape[1]):
            self.add(idx, rows)

    def flush(self) -> None:
        self.sum.flush()
        self.seen.flush()

    def close_and_remove(self) -> None:
        del self.sum, self.seen
        for name in (SUM_F32, SEEN_U8):
            remove(self.directory / name)


def normalizer_states(normalizers: Mapping[str, Normalizer]) -> dict[str, NormalizerState]:
    return {k: NormalizerState(n.kind, dict(n.tensors())) for k, n in normalizers.items()}


def save_build_config(directory: Path, record: Any) -> Path:
    """``config.yaml`` as ``build`` writes it (our ``BuildConfig`` plus bergson's
    ``index_cfg``/``preprocess_cfg``), so the query side (``serve``, ``score``) can load
    the model and make query gradients the way the store's rows were made."""
    import yaml

    from ..store.config_yaml import build_step_body
    from ..store.run_dir import CONFIG_YAML, run_metadata

    doc = {"steps": [{"build": build_step_body(record)}], "metadata": run_metadata()}
    path = directory / CONFIG_YAML
    with path.open("w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def commit_store(
    part: Path,
    final: Path,
    buffer: SumBuffer,
    *,
    grad_sizes: dict[str, int],
    dtype: torch.dtype,
    processor: ProcessorConfig,
    normalizers: Mapping[str, Normalizer],
    record: Any = None,
    chunk: int = 8192,
) -> Path:
    """Write ``buffer`` as a gradient store into ``part`` and rename it to ``final``;
    ``record`` (a ``BuildConfig`` for ``final``, if given) becomes its ``config.yaml``."""
    num_items, _ = buffer.shape
    unseen = int(num_items - int(np.count_nonzero(buffer.seen)))
    if unseen:
        log.warning(
            "%s: %d of %d examples were not trained on; their rows are zero", final, unseen, num_items
        )
    writer = GradientStoreWriter(part, num_items=num_items, grad_sizes=grad_sizes, dtype=dtype)
    for lo in range(0, num_items, chunk):
        hi = min(lo + chunk, num_items)
        writer.write_rows(np.arange(lo, hi), np.asarray(buffer.sum[lo:hi]))
    writer.close()
    save_processor(part, processor, normalizers=normalizer_states(normalizers))
    if record is not None:
        save_build_config(part, record)
    buffer.close_and_remove()
    drop_shards(part)
    if final.exists():
        remove(final)
    os.replace(part, final)
    log.info("gradient store %s: %d rows", final, num_items)
    return final


def save_order(path: Path, records: list[dict]) -> Path:
    """``order.hf`` (``_idx``, ``global_step``, ``epoch`` per trained example), atomically."""
    from datasets import Dataset

    final = path / "order.hf"
    part = part_of(final)
    remove(part)
    columns = {
        "_idx": [int(r["_idx"]) for r in records],
        "global_step": [int(r["global_step"]) for r in records],
        "epoch": [int(r["epoch"]) for r in records],
    }
    Dataset.from_dict(columns).save_to_disk(str(part))
    remove(final)
    os.replace(part, final)
    return final
