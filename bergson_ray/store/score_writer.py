"""Writing a score store (bergson-spec §2.4) cell by cell, resumable; layout in
:mod:`bergson_ray.store.score_layout`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bergson_ray.errors import BadInputError, StoreError
from bergson_ray.store.elements import to_storage
from bergson_ray.store.files import (
    INFO_JSON,
    OFFSETS_NPY,
    check_indices,
    check_offsets,
    presize,
    write_json_atomic,
)
from bergson_ray.store.score_layout import SCORES_BIN, ScoreFile, score_layout


class ScoreWriter(ScoreFile):
    """Create a zero-filled score store; :meth:`reopen` continues one (never recreating it)."""

    def __init__(
        self,
        path: str | Path,
        num_rows: int,
        num_scores: int,
        dtype: str | torch.dtype | np.dtype = "float32",
        *,
        attribute_tokens: bool = False,
        offsets: np.ndarray | Sequence[int] | None = None,
    ):
        path = Path(path)
        num_rows, num_scores = int(num_rows), int(num_scores)  # numpy ints are not JSON
        if (path / SCORES_BIN).exists():
            raise StoreError(
                f"{path / SCORES_BIN} already exists; use ScoreWriter.reopen to continue it"
            )
        layout = score_layout(num_scores, dtype)
        if attribute_tokens:
            if offsets is None:
                raise BadInputError("a per-token score store needs offsets")
            offsets = np.asarray(offsets, dtype=np.int64)
            check_offsets(offsets, len(offsets) - 1)
            if int(offsets[-1]) != num_rows:
                raise BadInputError(f"offsets end at {int(offsets[-1])} but num_rows={num_rows}")
            num_items = len(offsets) - 1
        elif offsets is not None:
            raise BadInputError("offsets are only meaningful with attribute_tokens=True")
        else:
            num_items = num_rows
        path.mkdir(parents=True, exist_ok=True)
        presize(path / SCORES_BIN, num_rows * layout["itemsize"])
        if offsets is not None:
            np.save(path / OFFSETS_NPY, offsets)
        info = {
            "attribute_tokens": attribute_tokens,
            "num_items": num_items,
            "num_rows": num_rows,
            "num_scores": num_scores,
            "dtype": layout,
        }
        write_json_atomic(path / INFO_JSON, info)
        self._load(path, "r+")

    @classmethod
    def reopen(cls, path: str | Path) -> ScoreWriter:
        """Open an existing store for more writes (resume). Validates sizes first."""
        self = cls.__new__(cls)
        self._load(Path(path), "r+")
        return self

    def _rows(self, rows_idx: np.ndarray | Sequence[int] | torch.Tensor) -> np.ndarray:
        return check_indices(rows_idx, self.num_rows, "row", self.path)

    def write(
        self,
        rows_idx: np.ndarray | Sequence[int] | torch.Tensor,
        scores: np.ndarray | torch.Tensor,
        *,
        query_offset: int = 0,
    ) -> None:
        """Write ``scores [n, w]`` into columns ``query_offset:query_offset+w`` of the
        given rows and set their written flags."""
        idx = self._rows(rows_idx)
        values = scores if isinstance(scores, torch.Tensor) else np.asarray(scores)
        if values.ndim == 1:
            values = values[:, None]
        n, width = values.shape
        if n != len(idx):
            raise BadInputError(f"{len(idx)} row indices but scores have {n} rows")
        if query_offset < 0 or query_offset + width > self.num_scores:
            raise BadInputError(
                f"score columns {query_offset}:{query_offset + width} exceed the store's "
                f"{self.num_scores} columns"
            )
        stored = to_storage(values, self.element)
        for j in range(width):
            q = query_offset + j
            self.mm[f"score_{q}"][idx] = stored[:, j]
            self.mm[f"written_{q}"][idx] = True

    def write_items(
        self,
        item_idx: np.ndarray | Sequence[int],
        token_scores: np.ndarray | torch.Tensor,
        *,
        query_offset: int = 0,
    ) -> None:
        """Per-token stores: consecutive token rows of ``item_idx``'s items, in order."""
        if self.offsets is None:
            raise BadInputError(f"{self.path} is a per-item score store: use write")
        items = np.asarray(item_idx, dtype=np.int64)
        if items.size and (items.min() < 0 or items.max() >= self.num_items):
            raise BadInputError(f"item index out of range [0, {self.num_items})")
        rows = (
            np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in items])
            if items.size
            else np.zeros(0, np.int64)
        )
        self.write(rows, token_scores, query_offset=query_offset)

    def missing_rows(self) -> np.ndarray:
        """Rows (int64, ascending) with at least one column not written yet."""
        return np.flatnonzero(~self._written_matrix().all(axis=1)).astype(np.int64)

    def is_complete(self) -> bool:
        return all(bool(np.all(self.mm[f"written_{i}"])) for i in range(self.num_scores))

    def flush(self) -> None:
        if isinstance(self.mm, np.memmap):
            self.mm.flush()

    def close(self) -> None:
        self.flush()
        self.mm = None  # type: ignore[assignment]

    def __enter__(self) -> ScoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
