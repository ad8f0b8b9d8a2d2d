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

import json
import logging
from collections import deque
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from bergson_ray.errors import BadInputError, StoreError
from bergson_ray.store.gradient_store import (
    INFO_JSON,
    OFFSETS_NPY,
    ElementType,
    _load_offsets,
    _open_memmap,
    _presize,
    _write_json,
    check_indices,
    check_offsets,
    element_type,
    to_float32,
    to_storage,
)

logger = logging.getLogger(__name__)

SCORES_BIN = "scores.bin"
CANDIDATES_NPY = "candidates.npy"
CONFIG_YAML = "config.yaml"

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


def _read_info(path: Path) -> dict[str, Any]:
    info_path = path / INFO_JSON
    if not info_path.is_file():
        raise StoreError(f"{info_path} is missing: {path} is not a score store")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{info_path} is not valid JSON: {e}") from e
    for key in ("num_rows", "num_scores", "dtype"):
        if key not in info:
            raise StoreError(f"{info_path}: '{key}' is missing")
    return info


def _check_scores_size(path: Path, num_rows: int, itemsize: int) -> None:
    if not path.is_file():
        raise StoreError(f"{path} is missing")
    found, expected = path.stat().st_size, num_rows * itemsize
    if found != expected:
        what = "truncated" if found < expected else "larger than expected"
        raise StoreError(
            f"{path} is {found} bytes ({what}); info.json implies num_rows={num_rows} x "
            f"record itemsize {itemsize} = {expected} bytes"
        )


class _ScoreFile:
    """What reader and writer share: info, record dtype, offsets, the memmap."""

    def _load(self, path: Path, mode: str) -> None:
        info = _read_info(path)
        source = str(path / INFO_JSON)
        self.path = path
        self.info = info
        self.num_rows = int(info["num_rows"])
        self.num_scores = int(info["num_scores"])
        self.attribute_tokens = bool(info.get("attribute_tokens", False))
        self.num_items = int(info.get("num_items", self.num_rows))
        self.record, self.element = _numpy_record(info["dtype"], self.num_scores, source)
        _check_scores_size(path / SCORES_BIN, self.num_rows, self.record.itemsize)
        self.offsets = (
            _load_offsets(path / OFFSETS_NPY, self.num_items, self.num_rows)
            if self.attribute_tokens
            else None
        )
        self.mm = _open_memmap(path / SCORES_BIN, self.record, (self.num_rows,), mode)

    @property
    def dtype(self) -> torch.dtype:
        return self.element.torch_dtype

    def _written_matrix(self) -> np.ndarray:
        out = np.empty((self.num_rows, self.num_scores), dtype=bool)
        for i in range(self.num_scores):
            out[:, i] = self.mm[f"written_{i}"]
        return out


class ScoreWriter(_ScoreFile):
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
        _presize(path / SCORES_BIN, num_rows * layout["itemsize"])
        if offsets is not None:
            np.save(path / OFFSETS_NPY, offsets)
        info = {
            "attribute_tokens": attribute_tokens,
            "num_items": num_items,
            "num_rows": num_rows,
            "num_scores": num_scores,
            "dtype": layout,
        }
        _write_json(path / INFO_JSON, info)
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


def _find_key(obj: Any, key: str) -> Any:
    """Breadth-first search for ``key`` in nested dicts/lists (shallowest wins)."""
    queue: deque[Any] = deque([obj])
    while queue:
        cur = queue.popleft()
        if isinstance(cur, dict):
            if key in cur:
                return cur[key]
            queue.extend(cur.values())
        elif isinstance(cur, list):
            queue.extend(cur)
    return None


def read_higher_is_better(run_dir: str | Path) -> bool | None:
    """``score_cfg.higher_is_better`` from a run's ``config.yaml`` (bergson's layout:
    ``steps: [{<command>: {score_cfg: {...}}}]``), else the shallowest
    ``higher_is_better`` anywhere in it; None without a config or the key."""
    path = Path(run_dir) / CONFIG_YAML
    if not path.is_file():
        return None
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise StoreError(f"{path} is not valid YAML: {e}") from e
    steps = doc.get("steps") if isinstance(doc, dict) else None
    for step in steps if isinstance(steps, list) else []:
        for body in step.values() if isinstance(step, dict) else []:
            score_cfg = body.get("score_cfg") if isinstance(body, dict) else None
            if isinstance(score_cfg, dict) and "higher_is_better" in score_cfg:
                return bool(score_cfg["higher_is_better"])
    value = _find_key(doc, "higher_is_better")
    return None if value is None else bool(value)


class ScoreStore(_ScoreFile):
    """Read-only score store (ours or bergson's)."""

    @classmethod
    def open(cls, path: str | Path) -> ScoreStore:
        path = Path(path)
        if not path.is_dir():
            part = path.with_name(path.name + ".part")
            hint = (
                f" ({part} exists: the run did not finish; rerun with --resume)"
                if part.is_dir()
                else ""
            )
            raise StoreError(f"score store {path} does not exist{hint}")
        self = cls.__new__(cls)
        self._load(path, "r")
        cand = path / CANDIDATES_NPY
        self.candidates = np.load(cand, allow_pickle=False) if cand.is_file() else None
        return self

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (
            f"ScoreStore({str(self.path)!r}, rows={self.num_rows}, scores={self.num_scores}, "
            f"dtype={self.element.name}, per_token={self.attribute_tokens})"
        )

    @cached_property
    def scores(self) -> np.ndarray:
        """float32 ``[num_rows, num_scores]`` (unwritten cells read as 0)."""
        out = np.empty((self.num_rows, self.num_scores), dtype=np.float32)
        for i in range(self.num_scores):
            out[:, i] = to_float32(self.mm[f"score_{i}"], self.element).numpy()
        return out

    @cached_property
    def written(self) -> np.ndarray:
        """bool ``[num_rows, num_scores]``."""
        return self._written_matrix()

    def is_complete(self) -> bool:
        return bool(self.written.all())

    def missing_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.written.all(axis=1)).astype(np.int64)

    @property
    def row_ids(self) -> np.ndarray:
        """Dataset row of each stored row: ``candidates.npy`` when present, else 0..n-1."""
        if self.candidates is not None:
            return np.asarray(self.candidates, dtype=np.int64)
        return np.arange(self.num_rows, dtype=np.int64)

    def item_of_row(self) -> np.ndarray | None:
        """Per-token stores: the document index of each token row."""
        if self.offsets is None:
            return None
        return np.repeat(np.arange(self.num_items, dtype=np.int64), np.diff(self.offsets))

    def to_arrow(self) -> Any:
        """Table with ``score_0..`` and ``row`` (plus ``item`` for per-token stores)."""
        import pyarrow as pa

        cols: dict[str, Any] = {
            f"score_{i}": pa.array(self.scores[:, i]) for i in range(self.num_scores)
        }
        cols["row"] = pa.array(self.row_ids)
        items = self.item_of_row()
        if items is not None:
            cols["item"] = pa.array(items)
        return pa.table(cols)

    def to_pandas(self) -> Any:
        return self.to_arrow().to_pandas()

    @cached_property
    def higher_is_better(self) -> bool | None:
        """From ``config.yaml`` beside the scores; None when there is none."""
        return read_higher_is_better(self.path)

    def loss_signed(self) -> np.ndarray:
        """Scores where negative means "reduces the query loss" (bergson's
        ``load_scores_loss_signed``): negated when ``higher_is_better`` is True."""
        return -self.scores if self.higher_is_better else self.scores.copy()


# -------------------------------------------------------------------------- top-k export


def _best_rows(col: np.ndarray, k: int, *, largest: bool) -> np.ndarray:
    """Indices of the ``k`` largest (or smallest) non-NaN values, best first, ties by row."""
    valid = np.flatnonzero(~np.isnan(col))
    k = min(k, len(valid))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    key = -col[valid] if largest else col[valid]  # smaller key = better
    cand = np.argpartition(key, k - 1)[:k] if k < len(valid) else np.arange(len(valid))
    order = np.lexsort((valid[cand], key[cand]))
    return valid[cand[order]]


def write_topk_parquet(
    path: str | Path,
    scores: np.ndarray | torch.Tensor,
    k: int,
    bottom_k: int = 0,
    texts: Sequence[str] | None = None,
    *,
    row_ids: np.ndarray | None = None,
) -> Path:
    """Per query column, the ``k`` highest-scoring rows (``direction="top"``) and the
    ``bottom_k`` lowest (``"bottom"``) as Parquet: ``query, rank, direction, row, score, text``.

    ``rank`` starts at 1 for the best row of each direction. NaN scores (e.g. unwritten
    cells converted to NaN by the caller) are never ranked. ``texts[r]`` is looked up by
    store row ``r``; ``row`` reports ``row_ids[r]`` when given (candidate subsets).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    arr = (
        scores.detach().float().cpu().numpy()
        if isinstance(scores, torch.Tensor)
        else np.asarray(scores, dtype=np.float32)
    )
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise BadInputError(f"scores must be [rows, queries], got shape {list(arr.shape)}")
    if k < 0 or bottom_k < 0:
        raise BadInputError(f"k and bottom_k must be >= 0, got {k}, {bottom_k}")
    if texts is not None and len(texts) != arr.shape[0]:
        raise BadInputError(f"{len(texts)} texts for {arr.shape[0]} score rows")
    out: dict[str, list[Any]] = {
        n: [] for n in ("query", "rank", "direction", "row", "score", "text")
    }
    for q in range(arr.shape[1]):
        for direction, n, largest in (("top", k, True), ("bottom", bottom_k, False)):
            for rank, r in enumerate(_best_rows(arr[:, q], n, largest=largest), start=1):
                r = int(r)
                out["query"].append(q)
                out["rank"].append(rank)
                out["direction"].append(direction)
                out["row"].append(int(row_ids[r]) if row_ids is not None else r)
                out["score"].append(float(arr[r, q]))
                out["text"].append(None if texts is None else str(texts[r]))
    schema = pa.schema(
        [
            ("query", pa.int32()),
            ("rank", pa.int32()),
            ("direction", pa.string()),
            ("row", pa.int64()),
            ("score", pa.float32()),
            ("text", pa.string()),
        ]
    )
    table = pa.table(out, schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
