"""Writing a gradient store (bergson-spec §2.1), rows in any order, resumable.

A store is a directory::

    gradients.bin   [num_grads, total_dim] little-endian C order, no header
    info.json       attribute_tokens, num_items, num_grads, grad_sizes, base_dtype
    offsets.npy     per-token stores: int64 [num_items + 1], item i = rows offsets[i]:offsets[i+1]
    written.bin     ours: uint8 [num_items], 1 once an item's rows are on disk (resume)

Rows are written at their own index into a pre-sized (sparse, zero-filled) file, so
workers may finish in any order and a resumed run only computes the items whose
``written`` flag is still 0. bergson ignores files it does not know, so the extra
``written.bin`` keeps the store readable by bergson.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bergson_ray.errors import BadInputError, StoreError
from bergson_ray.store.elements import element_type
from bergson_ray.store.files import (
    INFO_JSON,
    OFFSETS_NPY,
    check_indices,
    check_offsets,
    open_memmap,
    presize,
    write_json_atomic,
)
from bergson_ray.store.gradient_info import GRADIENTS_BIN, WRITTEN_BIN, StoreInfo, read_layout
from bergson_ray.store.row_sink import RowSink

logger = logging.getLogger(__name__)


class GradientStoreWriter:
    """Pre-sized gradient store that accepts rows in any order (and twice, harmlessly).

    Create a new store with the constructor, or continue one with :meth:`reopen`.
    Call :meth:`flush` (or :meth:`close`) before committing the run directory.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        num_items: int,
        grad_sizes: dict[str, int],
        dtype: str | torch.dtype | np.dtype = "float32",
        attribute_tokens: bool = False,
        offsets: np.ndarray | Sequence[int] | None = None,
    ):
        path = Path(path)
        num_items = int(num_items)  # numpy ints are not JSON
        if (path / GRADIENTS_BIN).exists() or (path / INFO_JSON).exists():
            raise StoreError(
                f"{path} already holds a gradient store; use GradientStoreWriter.reopen to "
                "continue it or remove it first"
            )
        if num_items < 0:
            raise BadInputError(f"num_items must be >= 0, got {num_items}")
        if not grad_sizes or any(int(s) <= 0 for s in grad_sizes.values()):
            raise BadInputError(
                f"grad_sizes must be non-empty with positive sizes, got {grad_sizes}"
            )
        et = element_type(dtype)
        if attribute_tokens:
            if offsets is None:
                raise BadInputError("a per-token store (attribute_tokens=True) needs offsets")
            offsets = np.asarray(offsets, dtype=np.int64)
            check_offsets(offsets, num_items)
            num_grads = int(offsets[-1])
        else:
            if offsets is not None:
                raise BadInputError("offsets are only meaningful with attribute_tokens=True")
            num_grads = num_items
        info = StoreInfo(
            num_items=num_items,
            num_grads=num_grads,
            grad_sizes={str(k): int(v) for k, v in grad_sizes.items()},
            base_dtype=et.name,
            attribute_tokens=attribute_tokens,
        )
        path.mkdir(parents=True, exist_ok=True)
        presize(path / GRADIENTS_BIN, num_grads * info.total_dim * et.itemsize)
        presize(path / WRITTEN_BIN, num_items)
        if offsets is not None:
            np.save(path / OFFSETS_NPY, offsets)
        write_json_atomic(path / INFO_JSON, info.to_json())  # last: its presence marks a store
        self._open(path, info, offsets)

    @classmethod
    def reopen(cls, path: str | Path) -> GradientStoreWriter:
        """Continue writing an existing store (a resumed run); nothing is recreated.

        A store without ``written.bin`` (written by bergson) gets an all-zero one, so
        every item counts as missing.
        """
        path = Path(path)
        info, offsets = read_layout(path)
        written = path / WRITTEN_BIN
        if not written.exists():
            logger.warning(
                "%s has no %s; treating every item as not yet written", path, WRITTEN_BIN
            )
            presize(written, info.num_items)
        elif written.stat().st_size != info.num_items:
            raise StoreError(
                f"{written} is {written.stat().st_size} bytes, expected one per item "
                f"({info.num_items})"
            )
        self = cls.__new__(cls)
        self._open(path, info, offsets)
        return self

    def _open(self, path: Path, info: StoreInfo, offsets: np.ndarray | None) -> None:
        self.path = path
        self.info = info
        self.element = info.element
        self.offsets = offsets
        self._rows = RowSink(path, info, offsets)
        self._written = open_memmap(
            path / WRITTEN_BIN, np.dtype(np.uint8), (info.num_items,), "r+"
        )

    # -- properties

    @property
    def num_items(self) -> int:
        return self.info.num_items

    @property
    def grad_sizes(self) -> dict[str, int]:
        return self.info.grad_sizes

    @property
    def attribute_tokens(self) -> bool:
        return self.info.attribute_tokens

    # -- writing

    def _item_index(self, item_idx: np.ndarray | Sequence[int] | torch.Tensor) -> np.ndarray:
        return check_indices(item_idx, self.num_items, "item", self.path)

    def write_rows(
        self, item_idx: np.ndarray | Sequence[int], rows: np.ndarray | torch.Tensor
    ) -> None:
        """Write ``rows[j]`` as item ``item_idx[j]``'s row and mark it written."""
        self._rows.write_rows(item_idx, rows)
        self.mark_written(item_idx)

    def write_items(
        self,
        item_idx: np.ndarray | Sequence[int],
        token_rows: np.ndarray | torch.Tensor,
        counts: np.ndarray | Sequence[int],
    ) -> None:
        """Per-token stores: item ``item_idx[j]``'s ``counts[j]`` consecutive rows of
        ``token_rows`` go to ``offsets[i]:offsets[i+1]``; counts must match the offsets."""
        self._rows.write_items(item_idx, token_rows, counts)
        self.mark_written(item_idx)

    def mark_written(self, item_idx: np.ndarray | Sequence[int]) -> None:
        """Mark items done: their rows are on disk (written here or by a worker's
        :class:`~bergson_ray.store.row_sink.RowSink`), or they keep their zero rows."""
        idx = self._item_index(item_idx)
        if idx.size:
            self._written[idx] = 1

    def missing_items(self) -> np.ndarray:
        """Indices (int64, ascending) of items not written yet."""
        return np.flatnonzero(self._written == 0).astype(np.int64)

    def is_complete(self) -> bool:
        return not np.any(self._written == 0)

    def flush(self) -> None:
        """Push rows, then flags, to the file system (flags last: a flag never precedes
        its row)."""
        self._rows.sync()
        if isinstance(self._written, np.memmap):
            self._written.flush()

    def close(self) -> None:
        self.flush()
        self._rows.close()
        self._written = None  # type: ignore[assignment]

    def __enter__(self) -> GradientStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
