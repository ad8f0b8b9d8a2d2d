"""Row matrices: where an index reads the gradient rows it is built from.

The FAISS code only ever asks for a contiguous range or a set of row indices as float32,
so a memory-mapped store and an in-memory array look the same to it and a build never
needs more than one chunk of the store in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from ..errors import StoreError


class RowMatrix(Protocol):
    """A ``[num_rows, dim]`` matrix readable in pieces as float32."""

    num_rows: int
    dim: int
    grad_sizes: dict[str, int]

    def read(self, start: int, stop: int) -> np.ndarray: ...

    def take(self, idx: np.ndarray) -> np.ndarray: ...


class ArrayRows:
    """Rows held in a numpy array (or a memmap); ``grad_sizes`` defaults to one block."""

    def __init__(self, rows: np.ndarray, grad_sizes: Mapping[str, int] | None = None):
        if rows.ndim != 2:
            raise ValueError(f"rows must be 2-D, got shape {rows.shape}")
        self.rows = rows
        self.num_rows, self.dim = (int(s) for s in rows.shape)
        self.grad_sizes = dict(grad_sizes) if grad_sizes else {"gradients": self.dim}
        if sum(self.grad_sizes.values()) != self.dim:
            raise ValueError(
                f"grad_sizes sum to {sum(self.grad_sizes.values())}, rows have {self.dim}"
            )

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.rows[start:stop], dtype=np.float32)

    def take(self, idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.rows[np.asarray(idx)], dtype=np.float32)


class StoreRows:
    """Rows of a :class:`~bergson_ray.store.gradient_store.GradientStore`.

    float32/float16 stores are read straight from the memmap; other dtypes (bf16) go
    through the store's own ``rows()`` converter.
    """

    def __init__(self, store: Any):
        self.store = store
        self.grad_sizes = dict(store.grad_sizes)
        self.num_rows = int(store.num_grads)
        self.dim = int(sum(self.grad_sizes.values()))
        raw = getattr(store, "raw", None)
        self._direct = raw is not None and np.dtype(raw.dtype) in (
            np.dtype(np.float32),
            np.dtype(np.float16),
        )
        if self._direct and raw.shape != (self.num_rows, self.dim):
            raise StoreError(
                f"gradient store {getattr(store, 'path', '?')}: gradients.bin has shape "
                f"{raw.shape}, info.json says ({self.num_rows}, {self.dim})"
            )

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._direct:
            return np.asarray(self.store.raw[start:stop], dtype=np.float32)
        return self.take(np.arange(start, stop))

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if self._direct:
            return np.asarray(self.store.raw[idx], dtype=np.float32)
        return self.store.rows(idx).float().numpy()


def as_row_matrix(obj: Any, grad_sizes: Mapping[str, int] | None = None) -> RowMatrix:
    """Wrap a numpy array or a GradientStore; pass through anything already a RowMatrix."""
    if isinstance(obj, np.ndarray):
        return ArrayRows(obj, grad_sizes)
    if hasattr(obj, "read") and hasattr(obj, "take") and hasattr(obj, "num_rows"):
        return obj
    if hasattr(obj, "grad_sizes") and hasattr(obj, "num_grads"):
        return StoreRows(obj)
    raise TypeError(f"cannot read rows from {type(obj).__name__}")
