"""bergson's score store (bergson-spec §2.4): ``scores.bin`` + ``info.json``.

``scores.bin`` holds ``num_rows`` records of a structured dtype with, per query column
``i``, a score ``score_i`` and a bool ``written_i``. Each (score, flag) pair takes
``A = next_pow2(itemsize(score) + 1)`` bytes (fp32 -> 8, fp16/bf16 -> 4), ``score_i``
sits at byte ``i*A`` and ``written_i`` right after it, and the record is padded to a
multiple of 8 bytes. The flags make a score run resumable cell by cell.

bfloat16 scores: bergson writes the field format as ``"bfloat16"`` (numpy's name for
``ml_dtypes.bfloat16``, which bergson imports so that ``np.dtype(info["dtype"])`` parses
it). We write the same string, so bergson reads our bf16 stores, and map it to a
``uint16`` field internally (no ml_dtypes dependency); torch converts the bit patterns.
Reading also accepts numpy spellings such as ``"<f4"``/``"<f2"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bergson_ray.errors import BadInputError, StoreError
from bergson_ray.store.elements import ElementType, element_type
from bergson_ray.store.files import INFO_JSON, OFFSETS_NPY, load_offsets, open_memmap, read_json

SCORES_BIN = "scores.bin"

_BOOL_FORMATS = {"bool", "|b1", "b1", "?", "bool_"}


def _pair_size(score_itemsize: int) -> int:
    """Bytes per (score, written) pair: the next power of two >= itemsize + 1."""
    return 1 << score_itemsize.bit_length()  # == next_pow2(itemsize + 1) for itemsize >= 1


def score_layout(num_scores: int, dtype: str | torch.dtype | np.dtype) -> dict[str, Any]:
    """The ``info.json`` ``dtype`` entry (names/formats/offsets/itemsize) bergson writes."""
    if num_scores < 1:
        raise BadInputError(f"a score store needs at least one score column, got {num_scores}")
    et = element_type(dtype)
    if et.name == "float64":
        raise BadInputError("score stores hold float32, float16 or bfloat16 scores, not float64")
    pair = _pair_size(et.itemsize)
    names, formats, offsets = [], [], []
    for i in range(num_scores):
        names += [f"score_{i}", f"written_{i}"]
        formats += [et.name, "bool"]
        offsets += [i * pair, i * pair + et.itemsize]
    itemsize = -(-num_scores * pair // 8) * 8
    return {"names": names, "formats": formats, "offsets": offsets, "itemsize": itemsize}


def _numpy_record(
    layout: dict[str, Any], num_scores: int, source: str
) -> tuple[np.dtype, ElementType]:
    """Turn an ``info.json`` dtype entry into our numpy dtype (bf16 fields as uint16)."""
    try:
        names = list(layout["names"])
        formats = list(layout["formats"])
        offsets = [int(o) for o in layout["offsets"]]
        itemsize = int(layout["itemsize"])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(
            f"{source}: 'dtype' needs names, formats, offsets and itemsize: {e}"
        ) from e
    if not len(names) == len(formats) == len(offsets):
        raise StoreError(f"{source}: dtype names/formats/offsets have different lengths")
    expected = [n for i in range(num_scores) for n in (f"score_{i}", f"written_{i}")]
    if sorted(names) != sorted(expected):
        raise StoreError(
            f"{source}: expected fields score_i/written_i for {num_scores} columns, found {names}"
        )
    score_types: set[str] = set()
    np_formats: list[np.dtype] = []
    for name, fmt in zip(names, formats):
        fmt = str(fmt)
        if name.startswith("written_"):
            if fmt not in _BOOL_FORMATS:
                raise StoreError(f"{source}: field {name} has format {fmt!r}, expected bool")
            np_formats.append(np.dtype(bool))
            continue
        try:
            et = element_type(fmt)
        except BadInputError as e:
            raise StoreError(f"{source}: field {name}: {e}") from e
        score_types.add(et.name)
        np_formats.append(et.storage)
    if len(score_types) != 1:
        raise StoreError(f"{source}: score columns have mixed dtypes {sorted(score_types)}")
    try:
        record = np.dtype(
            {"names": names, "formats": np_formats, "offsets": offsets, "itemsize": itemsize}
        )
    except ValueError as e:
        raise StoreError(f"{source}: invalid structured dtype: {e}") from e
    return record, element_type(score_types.pop())


def read_score_info(path: Path) -> dict[str, Any]:
    info_path = path / INFO_JSON
    info = read_json(info_path, f"{path} is not a score store")
    for key in ("num_rows", "num_scores", "dtype"):
        if key not in info:
            raise StoreError(f"{info_path}: '{key}' is missing")
    return info


def check_scores_size(path: Path, num_rows: int, itemsize: int) -> None:
    if not path.is_file():
        raise StoreError(f"{path} is missing")
    found, expected = path.stat().st_size, num_rows * itemsize
    if found != expected:
        what = "truncated" if found < expected else "larger than expected"
        raise StoreError(
            f"{path} is {found} bytes ({what}); info.json implies num_rows={num_rows} x "
            f"record itemsize {itemsize} = {expected} bytes"
        )


class ScoreFile:
    """What reader and writer share: info, record dtype, offsets, the memmap."""

    def _load(self, path: Path, mode: str) -> None:
        info = read_score_info(path)
        source = str(path / INFO_JSON)
        self.path = path
        self.info = info
        self.num_rows = int(info["num_rows"])
        self.num_scores = int(info["num_scores"])
        self.attribute_tokens = bool(info.get("attribute_tokens", False))
        self.num_items = int(info.get("num_items", self.num_rows))
        self.record, self.element = _numpy_record(info["dtype"], self.num_scores, source)
        check_scores_size(path / SCORES_BIN, self.num_rows, self.record.itemsize)
        self.offsets = (
            load_offsets(path / OFFSETS_NPY, self.num_items, self.num_rows)
            if self.attribute_tokens
            else None
        )
        self.mm = open_memmap(path / SCORES_BIN, self.record, (self.num_rows,), mode)

    @property
    def dtype(self) -> torch.dtype:
        return self.element.torch_dtype

    def _written_matrix(self) -> np.ndarray:
        out = np.empty((self.num_rows, self.num_scores), dtype=bool)
        for i in range(self.num_scores):
            out[:, i] = self.mm[f"written_{i}"]
        return out
