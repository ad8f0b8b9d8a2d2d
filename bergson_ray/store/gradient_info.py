"""A gradient store's ``info.json`` (bergson-spec §2.1), current and legacy layouts,
and the size check of ``gradients.bin`` against it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bergson_ray.errors import BadInputError, StoreError
from bergson_ray.store.elements import ElementType, element_type
from bergson_ray.store.files import INFO_JSON, OFFSETS_NPY, load_offsets, read_json

GRADIENTS_BIN = "gradients.bin"
WRITTEN_BIN = "written.bin"
"""ours: uint8 [num_items], 1 once an item's rows are on disk (resume); bergson ignores it."""
DATA_HF = "data.hf"
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
        raw = read_json(path, f"{directory} is not a gradient store")
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


def read_layout(path: Path) -> tuple[StoreInfo, np.ndarray | None]:
    """An existing store's ``info.json`` (checked against the size of ``gradients.bin``)
    and, for per-token stores, its ``offsets.npy``."""
    if (path / "scores.bin").is_file() and not (path / GRADIENTS_BIN).is_file():
        raise StoreError(
            f"{path} is a score store (scores.bin), not a gradient store: pass a store "
            "written by build or reduce"
        )
    info = StoreInfo.read(path)
    check_bin_size(path / GRADIENTS_BIN, info)
    offsets = (
        load_offsets(path / OFFSETS_NPY, info.num_items, info.num_grads)
        if info.attribute_tokens
        else None
    )
    return info, offsets


def check_bin_size(path: Path, info: StoreInfo) -> None:
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
