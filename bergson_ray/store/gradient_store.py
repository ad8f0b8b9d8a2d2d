"""Reading a gradient store written by us or by bergson (bergson-spec §2.1).

A store is ``gradients.bin`` (``[num_grads, total_dim]``, no header) beside ``info.json``
(see :mod:`bergson_ray.store.gradient_info`), plus ``offsets.npy`` for per-token stores;
:mod:`bergson_ray.store.gradient_writer` writes them. bfloat16 rows are memory-mapped as
``uint16`` bit patterns (see :mod:`bergson_ray.store.elements`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from bergson_ray.errors import BadInputError, StoreError
from bergson_ray.store.elements import to_float32
from bergson_ray.store.files import open_memmap
from bergson_ray.store.gradient_info import (
    DATA_HF,
    GRADIENTS_BIN,
    WRITTEN_BIN,
    StoreInfo,
    read_layout,
)
from bergson_ray.utils.columns import column_offsets

logger = logging.getLogger(__name__)



class RowChunk(NamedTuple):
    start: int
    stop: int
    rows: torch.Tensor
    """float32 ``[stop - start, width]``."""


class GradientStore:
    """Read-only view of a gradient store written by us or by bergson (any version)."""

    def __init__(self, path: Path, info: StoreInfo, offsets: np.ndarray | None):
        self.path = path
        self.info = info
        self.offsets = offsets
        self.element = info.element
        self.raw: np.ndarray = open_memmap(
            path / GRADIENTS_BIN, self.element.storage, (info.num_grads, info.total_dim), "r"
        )
        """``[num_grads, total_dim]`` read-only memmap (bfloat16 as uint16 bit patterns)."""

    @classmethod
    def open(cls, path: str | Path) -> GradientStore:
        """Open and validate a store; every problem raises :class:`StoreError`."""
        path = Path(path)
        if not path.is_dir():
            part = path.with_name(path.name + ".part")
            if part.is_dir():
                raise StoreError(
                    f"{path} does not exist but {part} does: that run did not finish "
                    "(rerun it with --resume)"
                )
            raise StoreError(f"gradient store {path} does not exist")
        if path.name.endswith(".part"):
            raise StoreError(
                f"{path} is an unfinished run (a .part directory); finish it with --resume "
                "and use the completed store"
            )
        info, offsets = read_layout(path)
        if not info.attribute_tokens and info.num_grads != info.num_items:
            logger.debug("%s: %d rows for %d items", path, info.num_grads, info.num_items)
        store = cls(path, info, offsets)
        written = store.written
        if written is not None and not written.all():
            raise StoreError(
                f"{path} is incomplete: {int(written.sum())} of {len(written)} rows were "
                "written; finish the run with --resume"
            )
        return store

    # -- metadata

    @property
    def grad_sizes(self) -> dict[str, int]:
        return self.info.grad_sizes

    @property
    def num_items(self) -> int:
        return self.info.num_items

    @property
    def num_grads(self) -> int:
        return self.info.num_grads

    @property
    def total_dim(self) -> int:
        return self.info.total_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.element.torch_dtype

    @property
    def attribute_tokens(self) -> bool:
        return self.info.attribute_tokens

    @cached_property
    def column_offsets(self) -> dict[str, tuple[int, int]]:
        return column_offsets(self.grad_sizes)

    def __len__(self) -> int:
        return self.num_grads

    def __repr__(self) -> str:
        return (
            f"GradientStore({str(self.path)!r}, items={self.num_items}, rows={self.num_grads}, "
            f"dim={self.total_dim}, dtype={self.info.base_dtype}, "
            f"per_token={self.attribute_tokens})"
        )

    @cached_property
    def written(self) -> np.ndarray | None:
        """Per-item written flags (bool) if the store has our ``written.bin``, else None."""
        path = self.path / WRITTEN_BIN
        if not path.is_file() or path.stat().st_size != self.num_items:
            return None
        return np.fromfile(path, dtype=np.uint8).astype(bool)

    @cached_property
    def data(self) -> Any:
        """The ``data.hf`` dataset beside the gradients, or None."""
        path = self.path / DATA_HF
        if not path.is_dir():
            return None
        from datasets import load_from_disk  # heavy import, only when asked

        return load_from_disk(str(path))

    @cached_property
    def processor(self) -> Any:
        """The store's :class:`~bergson_ray.store.processor.ProcessorConfig`, or None."""
        from bergson_ray.store.processor import ProcessorConfig

        return ProcessorConfig.load(self.path)

    # -- rows

    def rows(self, idx: int | slice | np.ndarray | Sequence[int]) -> torch.Tensor:
        """Rows as a float32 tensor ``[n, total_dim]`` (a copy, never a view of the file)."""
        if isinstance(idx, (int, np.integer)):
            idx = slice(int(idx), int(idx) + 1)
        elif not isinstance(idx, slice):
            idx = np.asarray(idx, dtype=np.int64)
        return to_float32(self.raw[idx], self.element)

    def _module_range(self, name: str) -> tuple[int, int]:
        try:
            return self.column_offsets[name]
        except KeyError:
            names = list(self.grad_sizes)
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            raise BadInputError(
                f"module {name!r} is not in store {self.path} (modules: {shown})"
            ) from None

    def module(self, name: str) -> np.ndarray:
        """Memmap column view ``[num_grads, grad_sizes[name]]`` (no copy; bf16 as uint16)."""
        lo, hi = self._module_range(name)
        return self.raw[:, lo:hi]

    def modules(
        self, names: Sequence[str], rows: slice | np.ndarray | Sequence[int] | None = None
    ) -> torch.Tensor:
        """float32 ``[n, sum of sizes]``: the given modules' columns, concatenated in order."""
        rows = slice(None) if rows is None else rows
        if not isinstance(rows, slice):
            rows = np.asarray(rows, dtype=np.int64)
        parts = [self.raw[rows, lo:hi] for lo, hi in (self._module_range(n) for n in names)]
        if not parts:
            raise BadInputError("modules(): no module names given")
        return torch.cat([to_float32(p, self.element) for p in parts], dim=1)

    def item_rows(self, i: int) -> torch.Tensor:
        """Per-token stores: item ``i``'s token rows, float32 ``[count, total_dim]``."""
        if self.offsets is None:
            raise BadInputError(f"{self.path} is not a per-token store; use rows()")
        if not 0 <= i < self.num_items:
            raise BadInputError(f"item {i} out of range [0, {self.num_items})")
        return self.rows(slice(int(self.offsets[i]), int(self.offsets[i + 1])))

    def iter_chunks(
        self, chunk_rows: int, *, modules: Sequence[str] | None = None
    ) -> Iterator[RowChunk]:
        """Stream the store in float32 chunks of at most ``chunk_rows`` rows.

        Only one chunk is in memory at a time, so stores larger than RAM can be scanned.
        """
        if chunk_rows <= 0:
            raise BadInputError(f"chunk_rows must be positive, got {chunk_rows}")
        for start in range(0, self.num_grads, chunk_rows):
            stop = min(start + chunk_rows, self.num_grads)
            sl = slice(start, stop)
            rows = self.modules(modules, sl) if modules is not None else self.rows(sl)
            yield RowChunk(start, stop, rows)
