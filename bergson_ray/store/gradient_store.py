"""bergson's gradient store, byte for byte (bergson-spec §2.1).

A store is a directory::

    gradients.bin   [num_grads, total_dim] little-endian C order, no header
    info.json       attribute_tokens, num_items, num_grads, grad_sizes, base_dtype
    offsets.npy     per-token stores: int64 [num_items + 1], item i = rows offsets[i]:offsets[i+1]
    written.bin     ours: uint8 [num_items], 1 once an item's rows are on disk (resume)

Rows are written at their own index into a pre-sized (sparse, zero-filled) file, so
workers may finish in any order and a resumed run only computes the items whose
``written`` flag is still 0. bergson ignores files it does not know, so the extra
``written.bin`` keeps the store readable by bergson.

bfloat16: numpy has no bf16 and we do not depend on ``ml_dtypes``, so bf16 elements
live in memory maps as ``uint16`` bit patterns and become tensors through
``torch.Tensor.view(torch.bfloat16)``. The bytes on disk are exactly bergson's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from bergson_ray.errors import BadInputError, StoreError

logger = logging.getLogger(__name__)

GRADIENTS_BIN = "gradients.bin"
INFO_JSON = "info.json"
OFFSETS_NPY = "offsets.npy"
WRITTEN_BIN = "written.bin"
DATA_HF = "data.hf"

# ------------------------------------------------------------------------------ dtypes


@dataclass(frozen=True)
class ElementType:
    """One element dtype as bergson names it, as we store it, and as torch sees it."""

    name: str
    """bergson's spelling (``np.dtype(...).name`` with ml_dtypes): float32, bfloat16, ..."""
    storage: np.dtype
    """What our memory maps hold: the float dtype itself, or ``<u2`` for bfloat16."""
    torch_dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    @property
    def is_bf16(self) -> bool:
        return self.torch_dtype == torch.bfloat16


_ELEMENTS = {
    "float32": ElementType("float32", np.dtype("<f4"), torch.float32),
    "float16": ElementType("float16", np.dtype("<f2"), torch.float16),
    "bfloat16": ElementType("bfloat16", np.dtype("<u2"), torch.bfloat16),
    "float64": ElementType("float64", np.dtype("<f8"), torch.float64),
}
_ALIASES = {
    "fp32": "float32", "f4": "float32", "<f4": "float32", "float": "float32",
    "fp16": "float16", "f2": "float16", "<f2": "float16", "half": "float16",
    "bf16": "bfloat16",
    "fp64": "float64", "f8": "float64", "<f8": "float64", "double": "float64",
}  # fmt: skip
_TORCH_TO_NAME = {e.torch_dtype: name for name, e in _ELEMENTS.items()}


def element_type(spec: str | torch.dtype | np.dtype | ElementType) -> ElementType:
    """Resolve a dtype given as bergson/numpy/torch name, torch or numpy dtype.

    Raises :class:`BadInputError` for anything that is not one of the four float types.
    """
    if isinstance(spec, ElementType):
        return spec
    if isinstance(spec, torch.dtype):
        name = _TORCH_TO_NAME.get(spec)
    elif isinstance(spec, np.dtype):
        name = spec.name if spec.name in _ELEMENTS else _ALIASES.get(spec.str.lower())
    else:
        key = str(spec).strip().lower().removeprefix("torch.")
        name = key if key in _ELEMENTS else _ALIASES.get(key)
    if name is None:
        raise BadInputError(
            f"unsupported element dtype {spec!r}; expected one of {sorted(_ELEMENTS)}"
        )
    return _ELEMENTS[name]


def to_storage(values: np.ndarray | torch.Tensor, et: ElementType) -> np.ndarray:
    """Cast ``values`` to ``et`` and return the array our memory maps hold."""
    if isinstance(values, torch.Tensor):
        t = values.detach().to(device="cpu", dtype=et.torch_dtype)
        if et.is_bf16:
            return t.contiguous().view(torch.int16).numpy().view(et.storage)
        return t.numpy()
    arr = np.asarray(values)
    if et.is_bf16:
        if not np.issubdtype(arr.dtype, np.floating):
            raise BadInputError(
                f"bfloat16 values must be given as floats (or a torch tensor), got {arr.dtype}"
            )
        return to_storage(torch.from_numpy(np.ascontiguousarray(arr)), et)
    return arr.astype(et.storage, copy=False)


def to_float32(stored: np.ndarray, et: ElementType) -> torch.Tensor:
    """Copy stored elements (possibly a memmap view) into a fresh float32 tensor."""
    arr = np.array(stored, copy=True, order="C")
    if et.is_bf16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(arr).float()


def _open_memmap(path: Path, dtype: np.dtype, shape: tuple[int, ...], mode: str) -> np.ndarray:
    """``np.memmap`` that also handles empty files (mmap cannot map zero bytes)."""
    if math.prod(shape) * dtype.itemsize == 0:
        arr = np.zeros(shape, dtype=dtype)
        arr.flags.writeable = mode != "r"
        return arr
    return np.memmap(path, dtype=dtype, mode=mode, shape=shape)


def _presize(path: Path, nbytes: int) -> None:
    """Create ``path`` with ``nbytes`` zero bytes without writing them (sparse file)."""
    with open(path, "wb") as f:
        f.truncate(nbytes)


def _write_json(path: Path, obj: Any) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a JSON file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _load_offsets(path: Path, num_items: int, num_grads: int) -> np.ndarray:
    if not path.is_file():
        raise StoreError(f"{path} is missing: info.json marks this as a per-token store")
    try:
        offsets = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise StoreError(f"cannot read {path} as a .npy array: {e}") from e
    check_offsets(offsets, num_items, where=str(path))
    if int(offsets[-1]) != num_grads:
        raise StoreError(
            f"{path} ends at {int(offsets[-1])} rows but info.json says num_grads={num_grads}"
        )
    return offsets.astype(np.int64, copy=False)


def check_offsets(offsets: np.ndarray, num_items: int, *, where: str = "offsets") -> None:
    """Per-token offsets: int [num_items + 1], starting at 0, never decreasing."""
    if offsets.ndim != 1 or len(offsets) != num_items + 1:
        raise StoreError(
            f"{where}: expected shape [{num_items + 1}] (num_items + 1), found {list(offsets.shape)}"
        )
    if not np.issubdtype(offsets.dtype, np.integer):
        raise StoreError(f"{where}: expected integer offsets, found {offsets.dtype}")
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise StoreError(f"{where}: offsets must start at 0 and never decrease")


def check_indices(
    values: np.ndarray | Sequence[int] | torch.Tensor, upper: int, what: str, where: Path | str
) -> np.ndarray:
    """``values`` as a 1-D int64 array of indices in ``[0, upper)``, or a clear error."""
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    idx = np.asarray(values)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise BadInputError(
            f"{what} indices must be a 1-D integer array, got {idx.dtype}{list(idx.shape)}"
        )
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= upper):
        raise BadInputError(
            f"{what} index out of range [0, {upper}): min {idx.min()}, max {idx.max()} "
            f"(store {where})"
        )
    return idx


def offsets_from_counts(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """``[0, c0, c0+c1, ...]`` as int64: the per-token offsets for row counts per item."""
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


# -------------------------------------------------------------------------------- info

_SHAPED_FORMAT = re.compile(r"^\s*\(([\d,\s]*)\)\s*(.+?)\s*$")
_TUPLE_FORMAT = re.compile(r"^\s*\(\s*'?([\w<>|=]+)'?\s*,\s*\(([\d,\s]*)\)\s*\)\s*$")


def _parse_legacy_format(fmt: str) -> tuple[int, str]:
    """Size and element of one legacy structured field.

    Accepts numpy's spellings: ``"(256,)<f4"``, ``"('<f4', (256,))"``,
    ``"(bfloat16, (256,))"`` (ml_dtypes) and a bare ``"<f4"`` (size 1).
    """
    m = _TUPLE_FORMAT.match(fmt)
    if m:
        elem, dims = m.group(1), m.group(2)
    else:
        m = _SHAPED_FORMAT.match(fmt)
        if not m:
            return 1, fmt.strip()
        dims, elem = m.group(1), m.group(2)
    return math.prod(int(d) for d in dims.replace(" ", "").split(",") if d), elem


@dataclass
class StoreInfo:
    """Contents of a gradient store's ``info.json``."""

    num_items: int
    num_grads: int
    grad_sizes: dict[str, int]
    base_dtype: str
    attribute_tokens: bool = False
    legacy: bool = False
    """Read from an old-style ``info.json`` (structured ``dtype``, no ``base_dtype``)."""

    @property
    def total_dim(self) -> int:
        return sum(self.grad_sizes.values())

    @property
    def element(self) -> ElementType:
        return element_type(self.base_dtype)

    def to_json(self) -> dict[str, Any]:
        """bergson's current ``info.json``, keys in bergson's order."""
        return {
            "attribute_tokens": self.attribute_tokens,
            "num_items": self.num_items,
            "num_grads": self.num_grads,
            "grad_sizes": dict(self.grad_sizes),
            "base_dtype": self.base_dtype,
        }

    @classmethod
    def from_json(cls, raw: Any, *, source: str = INFO_JSON) -> StoreInfo:
        """Parse current and legacy ``info.json`` files, with errors naming ``source``."""
        if not isinstance(raw, dict):
            raise StoreError(f"{source}: expected a JSON object, found {type(raw).__name__}")
        legacy_dtype = raw.get("dtype")
        grad_sizes = raw.get("grad_sizes")
        try:
            if "base_dtype" in raw:
                base = element_type(raw["base_dtype"]).name
            elif isinstance(legacy_dtype, dict) and legacy_dtype.get("formats"):
                base = element_type(_parse_legacy_format(str(legacy_dtype["formats"][0]))[1]).name
            else:
                raise StoreError(
                    f"{source}: neither 'base_dtype' nor a legacy structured 'dtype' is present"
                )
        except BadInputError as e:
            raise StoreError(f"{source}: {e}") from e

        if isinstance(legacy_dtype, dict) and "names" in legacy_dtype:
            legacy_sizes = _legacy_grad_sizes(legacy_dtype, base, source)
            if grad_sizes is None:
                grad_sizes = legacy_sizes
            elif list(grad_sizes.items()) != list(legacy_sizes.items()):
                raise StoreError(
                    f"{source}: grad_sizes {grad_sizes} disagree with the structured dtype's "
                    f"fields {legacy_sizes}"
                )
        if not isinstance(grad_sizes, dict) or not grad_sizes:
            raise StoreError(f"{source}: 'grad_sizes' must be a non-empty mapping module -> size")
        if not all(isinstance(v, int) and v > 0 for v in grad_sizes.values()):
            raise StoreError(f"{source}: every grad_sizes value must be a positive integer")
        if "num_grads" not in raw:
            raise StoreError(f"{source}: 'num_grads' is missing")
        num_grads = int(raw["num_grads"])
        attribute_tokens = bool(raw.get("attribute_tokens", False))
        num_items = int(raw.get("num_items", num_grads))
        return cls(
            num_items=num_items,
            num_grads=num_grads,
            grad_sizes={str(k): int(v) for k, v in grad_sizes.items()},
            base_dtype=base,
            attribute_tokens=attribute_tokens,
            legacy="base_dtype" not in raw,
        )

    @classmethod
    def read(cls, directory: Path) -> StoreInfo:
        path = directory / INFO_JSON
        if not path.is_file():
            raise StoreError(f"{path} is missing: {directory} is not a gradient store")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{path} is not valid JSON: {e}") from e
        return cls.from_json(raw, source=str(path))


def _legacy_grad_sizes(dtype: dict, base: str, source: str) -> dict[str, int]:
    """Module sizes from an old structured dtype, checking its packed ``itemsize``."""
    names, formats = dtype.get("names", []), dtype.get("formats", [])
    if len(names) != len(formats):
        raise StoreError(f"{source}: dtype has {len(names)} names but {len(formats)} formats")
    sizes: dict[str, int] = {}
    for name, fmt in zip(names, formats):
        size, elem = _parse_legacy_format(str(fmt))
        try:
            if element_type(elem).name != base:
                raise StoreError(f"{source}: module {name!r} has format {fmt!r}, others {base}")
        except BadInputError as e:
            raise StoreError(f"{source}: module {name!r}: {e}") from e
        sizes[str(name)] = size
    itemsize = dtype.get("itemsize")
    expected = sum(sizes.values()) * element_type(base).itemsize
    if itemsize is not None and int(itemsize) != expected:
        raise StoreError(
            f"{source}: structured dtype itemsize is {itemsize} bytes but its fields sum to "
            f"{expected} bytes (sum of sizes {sum(sizes.values())} x {element_type(base).itemsize})"
        )
    return sizes


def _check_bin_size(path: Path, info: StoreInfo) -> None:
    if not path.is_file():
        raise StoreError(f"{path} is missing")
    found = path.stat().st_size
    expected = info.num_grads * info.total_dim * info.element.itemsize
    if found != expected:
        what = "truncated" if found < expected else "larger than expected"
        raise StoreError(
            f"{path} is {found} bytes ({what}); info.json implies num_grads={info.num_grads} x "
            f"sum(grad_sizes)={info.total_dim} x {info.element.itemsize}-byte {info.base_dtype} "
            f"= {expected} bytes"
        )


def column_offsets(grad_sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Module -> ``(start, end)`` column range in a flat row (cumulative ``grad_sizes``)."""
    out, start = {}, 0
    for name, size in grad_sizes.items():
        out[name] = (start, start + size)
        start += size
    return out


# ------------------------------------------------------------------------------ writer


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
        _presize(path / GRADIENTS_BIN, num_grads * info.total_dim * et.itemsize)
        _presize(path / WRITTEN_BIN, num_items)
        if offsets is not None:
            np.save(path / OFFSETS_NPY, offsets)
        _write_json(path / INFO_JSON, info.to_json())  # last: its presence marks a store
        self._open(path, info, offsets)

    @classmethod
    def reopen(cls, path: str | Path) -> GradientStoreWriter:
        """Continue writing an existing store (a resumed run); nothing is recreated.

        A store without ``written.bin`` (written by bergson) gets an all-zero one, so
        every item counts as missing.
        """
        path = Path(path)
        info = StoreInfo.read(path)
        _check_bin_size(path / GRADIENTS_BIN, info)
        offsets = (
            _load_offsets(path / OFFSETS_NPY, info.num_items, info.num_grads)
            if info.attribute_tokens
            else None
        )
        written = path / WRITTEN_BIN
        if not written.exists():
            logger.warning(
                "%s has no %s; treating every item as not yet written", path, WRITTEN_BIN
            )
            _presize(written, info.num_items)
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
        self._grads = _open_memmap(
            path / GRADIENTS_BIN, self.element.storage, (info.num_grads, info.total_dim), "r+"
        )
        self._written = _open_memmap(
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

    def _rows_array(self, rows: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
        arr = to_storage(rows, self.element)
        expected = (n, self.info.total_dim)
        if arr.shape != expected:
            raise BadInputError(
                f"rows have shape {list(arr.shape)}, expected {list(expected)} "
                f"(rows x sum(grad_sizes)) for store {self.path}"
            )
        return arr

    def write_rows(
        self, item_idx: np.ndarray | Sequence[int], rows: np.ndarray | torch.Tensor
    ) -> None:
        """Write ``rows[j]`` as item ``item_idx[j]``'s row and mark it written."""
        if self.attribute_tokens:
            raise BadInputError(f"{self.path} is a per-token store: use write_items")
        idx = self._item_index(item_idx)
        arr = self._rows_array(rows, len(idx))
        if idx.size:
            self._grads[idx] = arr
            self._written[idx] = 1

    def write_items(
        self,
        item_idx: np.ndarray | Sequence[int],
        token_rows: np.ndarray | torch.Tensor,
        counts: np.ndarray | Sequence[int],
    ) -> None:
        """Per-token stores: item ``item_idx[j]``'s ``counts[j]`` consecutive rows of
        ``token_rows`` go to ``offsets[i]:offsets[i+1]``; counts must match the offsets."""
        if not self.attribute_tokens or self.offsets is None:
            raise BadInputError(f"{self.path} is a per-item store: use write_rows")
        idx = self._item_index(item_idx)
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
        arr = self._rows_array(token_rows, total)
        if total:
            first_row_of_item = np.concatenate([[0], np.cumsum(counts)[:-1]])
            dest = np.repeat(self.offsets[idx] - first_row_of_item, counts) + np.arange(total)
            self._grads[dest] = arr
        if idx.size:
            self._written[idx] = 1

    def mark_written(self, item_idx: np.ndarray | Sequence[int]) -> None:
        """Mark items done without writing rows (documents that keep their zero rows)."""
        idx = self._item_index(item_idx)
        if idx.size:
            self._written[idx] = 1

    def missing_items(self) -> np.ndarray:
        """Indices (int64, ascending) of items not written yet."""
        return np.flatnonzero(self._written == 0).astype(np.int64)

    def is_complete(self) -> bool:
        return not np.any(self._written == 0)

    def flush(self) -> None:
        """Push data, then flags, to the file system (flags last: a flag never precedes its row)."""
        for arr in (self._grads, self._written):
            if isinstance(arr, np.memmap):
                arr.flush()

    def close(self) -> None:
        self.flush()
        self._grads = self._written = None  # type: ignore[assignment]

    def __enter__(self) -> GradientStoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------ reader


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
        self.raw: np.ndarray = _open_memmap(
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
        info = StoreInfo.read(path)
        _check_bin_size(path / GRADIENTS_BIN, info)
        offsets = (
            _load_offsets(path / OFFSETS_NPY, info.num_items, info.num_grads)
            if info.attribute_tokens
            else None
        )
        if not info.attribute_tokens and info.num_grads != info.num_items:
            logger.debug("%s: %d rows for %d items", path, info.num_grads, info.num_items)
        return cls(path, info, offsets)

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

    def column_index(self, names: Sequence[str]) -> np.ndarray:
        """Flat column indices of ``names`` in the given order."""
        ranges = [self._module_range(n) for n in names]
        return (
            np.concatenate([np.arange(lo, hi) for lo, hi in ranges])
            if ranges
            else np.zeros(0, np.int64)
        )

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
