"""Writing gradient rows into an existing store from any process, on any node.

The driver creates the store (``info.json``, a pre-sized ``gradients.bin``, per-token
``offsets.npy``) and owns its ``written`` bitmap; the workers that compute the rows
write them here themselves, so gradient bytes never travel through the driver (one
process on one node would otherwise cap a whole cluster's output).

Writes are ``pwritev``/``pwrite`` calls of exactly the rows' bytes, never memory-mapped pages: two
workers on two NFS clients may own rows that share a page, and a page written back
whole from one client would overwrite the other's rows. :meth:`RowSink.sync` makes the
rows durable; the driver marks them written only after the batch that carried them
returned, so a row flagged in ``written`` is on disk (``--resume`` relies on it).
Writing a row twice (a re-run batch) writes the same bytes again: harmless.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bergson_ray.errors import BadInputError
from bergson_ray.store.elements import to_storage
from bergson_ray.store.files import check_indices
from bergson_ray.store.gradient_info import GRADIENTS_BIN, StoreInfo, read_layout

HAVE_PWRITEV = hasattr(os, "pwritev")


def _iov_max() -> int:
    """Buffers one ``pwritev`` call takes (1024 on Linux; POSIX guarantees 16)."""
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        return 16
    return n if n > 0 else 16


IOV_MAX = _iov_max()


class RowSink:
    """Positional writes of rows into a store's ``gradients.bin`` (no bitmap, no rename).

    ``RowSink(path)`` opens the store the driver created; ``RowSink(path, info,
    offsets)`` skips re-reading its layout (the driver's own writer).
    """

    def __init__(
        self, path: str | Path, info: StoreInfo | None = None, offsets: np.ndarray | None = None
    ):
        self.path = Path(path)
        if info is None:
            info, offsets = read_layout(self.path)
        self.info = info
        self.offsets = offsets
        self.element = info.element
        self.row_bytes = info.total_dim * self.element.itemsize
        self._fd: int | None = os.open(self.path / GRADIENTS_BIN, os.O_RDWR)
        self.bytes_written = 0

    # -- writing -------------------------------------------------------------------
    def write_rows(self, item_idx: np.ndarray | Sequence[int], rows) -> None:
        """Per-item stores: ``rows[j]`` is item ``item_idx[j]``'s row."""
        if self.info.attribute_tokens:
            raise BadInputError(f"{self.path} is a per-token store: use write_items")
        idx = check_indices(item_idx, self.info.num_items, "item", self.path)
        self._put(idx, self._rows(rows, len(idx)))

    def write_items(
        self, item_idx: np.ndarray | Sequence[int], token_rows, counts: np.ndarray | Sequence[int]
    ) -> None:
        """Per-token stores: item ``item_idx[j]``'s ``counts[j]`` consecutive rows of
        ``token_rows`` go to ``offsets[i]:offsets[i+1]``; counts must match the offsets."""
        if not self.info.attribute_tokens or self.offsets is None:
            raise BadInputError(f"{self.path} is a per-item store: use write_rows")
        idx = check_indices(item_idx, self.info.num_items, "item", self.path)
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != idx.shape:
            raise BadInputError(f"{len(idx)} items but {counts.size} counts")
        expected = self.offsets[idx + 1] - self.offsets[idx]
        bad = np.flatnonzero(counts != expected)
        if bad.size:
            j = int(bad[0])
            raise BadInputError(
                f"item {int(idx[j])} has {int(counts[j])} token rows but the store's offsets "
                f"reserve {int(expected[j])} ({bad.size} mismatching items in this batch)"
            )
        total = int(counts.sum())
        arr = self._rows(token_rows, total)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        dest = np.repeat(self.offsets[idx] - first, counts) + np.arange(total, dtype=np.int64)
        self._put(dest, arr)

    def sync(self) -> None:
        """Make every row written so far durable (before the driver flags it written)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RowSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a worker torn down without close()
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- internals -----------------------------------------------------------------
    def _rows(self, rows, n: int) -> np.ndarray:
        if isinstance(rows, np.ndarray) and self.element.is_bf16 and rows.dtype == np.uint16:
            arr = rows  # bf16 bit patterns, as workers ship them
        else:
            arr = to_storage(rows if not isinstance(rows, list) else np.asarray(rows), self.element)
        expected = (n, self.info.total_dim)
        if arr.shape != expected:
            raise BadInputError(
                f"rows have shape {list(arr.shape)}, expected {list(expected)} "
                f"(rows x sum(grad_sizes)) for store {self.path}"
            )
        return np.ascontiguousarray(arr)

    def _put(self, dest: np.ndarray, arr: np.ndarray) -> None:
        """Write ``arr[j]`` at row ``dest[j]``: one vectored write per run of adjacent rows.

        The rows are never gathered into sorted order (a copy the size of the batch:
        64 unprojected rows of a small model are hundreds of MiB); each run's rows go to
        ``pwritev`` as views, and rows already in order (the usual window) as one view.
        """
        if self._fd is None:
            raise BadInputError(f"the row sink of {self.path} is closed")
        if not len(dest):
            return
        order = np.argsort(dest, kind="stable")
        sorted_dest = dest[order]
        breaks = np.flatnonzero(np.diff(sorted_dest) != 1) + 1
        starts = np.concatenate([[0], breaks]).tolist()
        ends = np.concatenate([breaks, [len(dest)]]).tolist()
        flat, rb = memoryview(arr).cast("B"), self.row_bytes
        for a, b in zip(starts, ends):
            src = order[a:b]
            if b - a == 1 or bool(np.all(np.diff(src) == 1)):  # already in order: one view
                parts = [flat[int(src[0]) * rb : (int(src[-1]) + 1) * rb]]
            else:
                parts = [flat[j * rb : (j + 1) * rb] for j in src.tolist()]
            self._write_at(parts, int(sorted_dest[a]) * self.row_bytes)
        self.bytes_written += arr.nbytes

    def _write_at(self, parts: list[memoryview], offset: int) -> None:
        """Write ``parts`` back to back from ``offset``, finishing any short write."""
        for i in range(0, len(parts), IOV_MAX):
            chunk = parts[i : i + IOV_MAX]
            done = os.pwritev(self._fd, chunk, offset) if HAVE_PWRITEV else 0
            for view in chunk:
                n = len(view)
                if done >= n:  # written whole by the vectored call
                    done -= n
                    offset += n
                    continue
                while done < n:  # pwrite(v) may write less than asked
                    done += os.pwrite(self._fd, view[done:], offset + done)
                offset += n
                done = 0
