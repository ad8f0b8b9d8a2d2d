"""Open the user's dataset as a memory-mapped ``datasets.Dataset``.

Why one entry point: every command (build, score, hessians, query) names its data the
same way (``DataConfig.dataset``), and the Ray workers re-open it on their own node from
the same config. Whatever the source -- the embedded ``tiny`` corpus, a ``save_to_disk``
dir, local parquet/jsonl/json/csv files, or a Hub id -- the result is an Arrow-backed
dataset whose memory use does not grow with corpus size.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bergson_ray.config import DataConfig
from bergson_ray.defaults.tiny import resolve_dataset
from bergson_ray.errors import BadInputError
from bergson_ray.utils.kv import parse_kv

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
"""File suffix -> ``datasets`` packaged builder."""

_SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")


# ----------------------------------------------------------------------------- splits


def _split_names(spec: str) -> list[str]:
    """Split names in a spec like ``train[:10%]+test[-5:]``."""
    return [part.split("[", 1)[0].strip() for part in spec.split("+")]


def _apply_split(get_split, spec: str) -> datasets.Dataset:
    """Resolve a split spec (with slicing and ``+``) against ``get_split(name)``.

    ``datasets.ReadInstruction`` does the parsing (percentages, negative bounds); each
    piece becomes a contiguous ``select`` so no indices mapping is created.
    """
    import datasets

    try:
        instruction = datasets.ReadInstruction.from_spec(spec)
    except (ValueError, AssertionError) as exc:
        raise BadInputError(f"invalid split {spec!r}: {exc}") from exc
    parts = {name: get_split(name) for name in _split_names(spec)}
    pieces = []
    for absolute in instruction.to_absolute({n: len(d) for n, d in parts.items()}):
        ds = parts[absolute.splitname]
        if absolute.from_ == 0 and absolute.to == len(ds):
            pieces.append(ds)
        else:
            pieces.append(ds.select(range(absolute.from_, absolute.to)))
    return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)


# ----------------------------------------------------------------------------- sources


def looks_local(name: str) -> bool:
    """A dataset name that can only mean a local path (never a Hub id)."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix.lower() in FILE_BUILDERS


def _is_save_to_disk_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in _SAVE_TO_DISK_MARKERS)


def _single_split(ds: datasets.Dataset, where: Any):
    """``get_split`` for a source with one split: "train" is it, any other name is an error
    (silently reading everything for ``--split test`` would attribute the wrong data)."""

    def get_split(name: str) -> datasets.Dataset:
        if name != "train":
            raise BadInputError(
                f"split {name!r} not found in {where}: it has one split, 'train' "
                "(slice it, e.g. --split 'train[:1000]')"
            )
        return ds

    return get_split


def _load_save_to_disk(path: Path, split: str) -> datasets.Dataset:
    import datasets

    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - e.g. datasets fails on a saved 0-row dataset
        raise BadInputError(
            f"could not open the saved dataset {str(path)!r} (is it empty or damaged?): "
            f"{type(exc).__name__}"
        ) from None
    if isinstance(obj, datasets.DatasetDict):

        def get_split(name: str) -> datasets.Dataset:
            if name not in obj:
                raise BadInputError(
                    f"split {name!r} not found in {path}; available splits are {sorted(obj)}"
                )
            return obj[name]

        return _apply_split(get_split, split)
    # A bare Dataset is one split, named "train" as datasets names local data.
    return _apply_split(_single_split(obj, path), split)


def _load_files(pattern: str, split: str, kwargs: dict[str, Any]) -> datasets.Dataset:
    import datasets

    files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise BadInputError(f"dataset file {pattern!r} does not exist (no file matches it)")
    suffix = Path(pattern).suffix.lower()
    builder = FILE_BUILDERS[suffix]
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise BadInputError(f"dataset file {empty[0]!r} is empty")
    try:
        full = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad file
        cause = exc.__cause__ or exc.__context__ or exc
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise BadInputError(
            f"could not read {pattern!r} as {builder} (is it a valid, UTF-8 {builder} file "
            f"with the same columns on every row?): {detail[:200]}"
        ) from None
    # Local files form one split, "train" (as datasets names it); its slice still applies.
    return _apply_split(_single_split(full, pattern), split)


def _load_data_folder(path: Path, split: str, kwargs: dict[str, Any]) -> datasets.Dataset:
    import datasets

    try:
        obj = datasets.load_dataset(str(path), **kwargs)
    except (ValueError, OSError) as exc:
        raise BadInputError(f"could not load the data folder {path}: {exc}") from exc

    def get_split(name: str) -> datasets.Dataset:
        if name not in obj:
            raise BadInputError(
                f"split {name!r} not found in {path}; available splits are {sorted(obj)}"
            )
        return obj[name]

    return _apply_split(get_split, split)


def _load_hub(name: str, cfg: DataConfig, kwargs: dict[str, Any]) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(name, cfg.subset, split=cfg.split, **kwargs)
    except (ValueError, OSError) as exc:  # OSError covers not-found and connection errors
        raise BadInputError(
            f"could not load dataset {name!r} (subset {cfg.subset!r}, split {cfg.split!r}) "
            f"from the Hugging Face Hub or its cache: {exc}"
        ) from exc


ROW_PLAN_COMMANDS = "build, score, reduce, hessian and ekfac"
"""The commands that map their rows through a ``data/row_plan.py`` plan."""


def load_dataset_rows(cfg: DataConfig, *, planned: bool = False) -> datasets.Dataset:
    """Open ``cfg.dataset`` (after resolving ``tiny``) as an Arrow-backed Dataset.

    Sources, checked in this order: an existing directory (``save_to_disk`` output, or a
    folder of data files), a ``.parquet``/``.jsonl``/``.json``/``.csv`` file or glob, a
    path-looking name that does not exist (error), else a Hub id.

    ``planned``: the caller maps its rows through a ``RowPlan`` (``--chunk_length``,
    ``--max_tokens``); any other caller would read the dataset's rows one to one, so
    those options are refused for it rather than silently ignored.
    """
    if not planned and (cfg.chunk_length or cfg.max_tokens is not None):
        flag = "--chunk_length" if cfg.chunk_length else "--max_tokens"
        raise BadInputError(f"{flag} is supported by {ROW_PLAN_COMMANDS} only")
    name = resolve_dataset(cfg.dataset)
    local = Path(os.path.expanduser(name))
    kwargs = parse_kv(cfg.data_kwargs, "--data_kwargs")
    if local.is_dir():
        if _is_save_to_disk_dir(local):
            ds = _load_save_to_disk(local, cfg.split)
        else:
            ds = _load_data_folder(local, cfg.split, kwargs)
    elif local.suffix.lower() in FILE_BUILDERS:
        ds = _load_files(str(local), cfg.split, kwargs)
    elif looks_local(name) or local.exists():
        raise BadInputError(
            f"dataset path {name!r} does not exist or is not a supported format "
            f"(a save_to_disk dir or a {'/'.join(FILE_BUILDERS)} file)"
        )
    else:
        ds = _load_hub(name, cfg, kwargs)
    if len(ds) == 0:
        raise BadInputError(f"dataset {cfg.dataset!r} (split {cfg.split!r}) has no rows")
    log.debug("loaded %s: %d rows, columns %s", name, len(ds), ds.column_names)
    return ds


# ----------------------------------------------------------------------------- columns


def needed_columns(cfg: DataConfig) -> list[str]:
    """The dataset columns that tokenization and the loss read, in a fixed order."""
    if cfg.completion_column and cfg.conversation_column:
        raise BadInputError("set completion_column or conversation_column, not both")
    if cfg.format_template:
        from bergson_ray.data.templates import load_template

        cols = load_template(cfg.format_template).columns()
    elif cfg.conversation_column:
        cols = [cfg.conversation_column]
    else:
        cols = [cfg.prompt_column]
        if cfg.completion_column:
            cols.append(cfg.completion_column)
    for extra in (cfg.reward_column, cfg.advantage_column):
        if extra and extra not in cols:
            cols.append(extra)
    return cols


def check_columns(column_names: list[str], cfg: DataConfig) -> None:
    """Raise :class:`BadInputError` naming every needed column the dataset lacks."""
    missing = [c for c in needed_columns(cfg) if c not in column_names]
    if missing:
        raise BadInputError(
            f"dataset {cfg.dataset!r} has no column(s) {', '.join(map(repr, missing))}; "
            f"available columns are {list(column_names)}"
        )


# ----------------------------------------------------------------------------- rows


def prompt_key(row_value: Any, conversation: bool) -> str:
    """Stable digest of a row's prompt, used to group GRPO rollouts of the same prompt.

    For a conversation the prompt is every message before the last assistant turn.
    Digests (not the text) are kept so grouping a huge dataset stays cheap in memory.
    """
    value = row_value
    if conversation and isinstance(value, list):
        last = max((i for i, m in enumerate(value) if _role(m) == "assistant"), default=None)
        value = value[:last] if last is not None else value
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def column_advantages(ds: datasets.Dataset, cfg: DataConfig) -> np.ndarray:
    """``--advantage_column``'s values as float32, checked: a missing or NaN value is an
    error naming the rows (``--skip_nan_rewards`` cannot drop rows here: row indices are
    the store's, so the rows must be dropped from the dataset first)."""
    col = cfg.advantage_column
    try:
        values = np.asarray(
            [np.nan if v is None else v for v in ds[col]], dtype=np.float64
        )
    except (TypeError, ValueError):
        raise BadInputError(f"column {col!r} (--advantage_column) must hold numbers") from None
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise BadInputError(
            f"{bad.size} advantage(s) in column {col!r} are NaN, infinite or missing (rows "
            f"{bad[:10].tolist()}{' ...' if bad.size > 10 else ''}): drop those rows from "
            "the dataset first (bergson_ray keeps row indices stable, so it does not drop rows)"
        )
    return values.astype(np.float32)


class DatasetRows:
    """Lazily opened dataset reader that can be pickled into Ray workers.

    Only the config travels; each process opens the (memory-mapped) dataset itself on
    first use. With ``with_advantages`` (and ``reward_column`` set), group-mean advantages
    are computed once over the whole dataset at open time and returned as an
    ``advantage`` column. It is opt-in because it reads two whole columns: a driver that
    already ships advantages to its workers should not make every worker redo it.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        with_advantages: bool = False,
        batch_size: int = 8192,
        planned: bool = False,
    ) -> None:
        self.cfg = cfg
        self.with_advantages = with_advantages
        self.planned = planned
        self._batch_size = batch_size
        self._ds: datasets.Dataset | None = None
        self._advantage: np.ndarray | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_ds"] = None
        state["_advantage"] = None
        return state

    @property
    def dataset(self) -> datasets.Dataset:
        """The needed columns of the dataset (opened on first access)."""
        if self._ds is None:
            ds = load_dataset_rows(self.cfg, planned=self.planned)
            check_columns(ds.column_names, self.cfg)
            self._ds = ds.select_columns(needed_columns(self.cfg))
            if self.cfg.reward_column and self.with_advantages:
                self._advantage = self._compute_advantages(self._ds)
            elif self.cfg.advantage_column and self.with_advantages:
                self._advantage = column_advantages(self._ds, self.cfg)
        return self._ds

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def advantage(self) -> np.ndarray | None:
        """Per-row advantage (NaN where a NaN reward was skipped), or None when not asked."""
        _ = self.dataset
        return self._advantage

    def _compute_advantages(self, ds: datasets.Dataset) -> np.ndarray:
        from bergson_ray.data.tokenize import estimate_advantages

        cfg = self.cfg
        group_col = cfg.conversation_column or cfg.prompt_column
        keys: list[str] = []
        rewards: list[float] = []
        for batch in ds.select_columns([group_col, cfg.reward_column]).iter(self._batch_size):
            keys.extend(prompt_key(v, bool(cfg.conversation_column)) for v in batch[group_col])
            rewards.extend(batch[cfg.reward_column])
        return estimate_advantages(keys, rewards, skip_nan=cfg.skip_nan_rewards)

    def rows(self, idx: np.ndarray) -> dict[str, list]:
        """Columns of rows ``idx`` (dataset positions), plus ``advantage`` in reward runs."""
        positions = [int(i) for i in np.asarray(idx).reshape(-1)]
        ds = self.dataset
        out = dict(ds[positions]) if positions else {c: [] for c in ds.column_names}
        if self._advantage is not None:
            out["advantage"] = self._advantage[positions].tolist()
        return out
