"""Which rows a candidate ``score`` run rescores: the best rows of an earlier run.

bergson's ``score_cfg.candidates``: a cheap run (a small projection, a plain inner
product) scores everything, and an expensive one (EK-FAC, no projection) rescores only
the rows it ranked best. The earlier run is a score directory (ours or bergson's) or the
CSV of ``query --record``. Per query column the ``top_k`` (or ``fraction`` of the) rows at
the ``direction`` end are kept; the candidates are the sorted union over the columns.

The rescored store is compact, exactly as bergson writes it: row ``k`` is dataset row
``candidates[k]``, and ``candidates.npy`` (int64, ascending) beside ``scores.bin`` says so.
:class:`~bergson_ray.store.score_store.ScoreStore` reads it (``row_ids``); bergson's
``load_scores`` does too.

Pure numpy and file reading: no Ray, no model.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from bergson_ray.config.candidates import CandidateConfig
from bergson_ray.errors import BadInputError, StoreError
from bergson_ray.store.score_store import CANDIDATES_NPY, ScoreStore

__all__ = [
    "CANDIDATES_NPY",
    "candidate_count",
    "keep_rows",
    "load_candidates",
    "record_rows",
    "save_candidates",
    "select_candidates",
]


def candidate_count(top_k: int, fraction: float, num_rows: int) -> int:
    """Rows kept per query column: ``top_k`` (at most every row), or ``fraction`` of the
    rows rounded as bergson rounds (Python's ``round``), at least one."""
    if (top_k > 0) == (fraction > 0):
        raise BadInputError("set exactly one of --top_k and --fraction")
    if top_k > 0:
        return min(top_k, num_rows)
    if not 0.0 < fraction <= 1.0:
        raise BadInputError(f"--fraction must be in (0, 1], got {fraction}")
    return max(1, round(fraction * num_rows))


def keep_rows(scores: np.ndarray, count: int, keep_high: bool) -> np.ndarray:
    """Sorted union over the columns of ``scores [rows, cols]`` of each column's ``count``
    highest (``keep_high``) or lowest rows.

    Ties at the boundary go to the lower row index and NaN ranks last at either end, so
    the choice is deterministic (bergson's ``argpartition`` leaves ties arbitrary).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    n = scores.shape[0]
    if count >= n:
        return np.arange(n, dtype=np.int64)
    keep = np.zeros(n, dtype=bool)
    for col in scores.T:
        key = -col if keep_high else col.copy()  # smallest key = best
        key[np.isnan(key)] = np.inf
        cut = np.partition(key, count - 1)[count - 1]
        better = np.flatnonzero(key < cut)
        tied = np.flatnonzero(key == cut)[: count - len(better)]
        keep[better] = True
        keep[tied] = True
    return np.flatnonzero(keep).astype(np.int64)


def _earlier_scores(path: Path, num_rows: int) -> tuple[np.ndarray, np.ndarray, ScoreStore]:
    """``(scores [rows, cols], dataset row of each stored row, store)`` of an earlier run."""
    store = ScoreStore.open(path)
    if store.attribute_tokens:
        raise BadInputError(f"--scores {path} holds per-token scores; give a per-document run")
    if not store.is_complete():
        raise BadInputError(
            f"--scores {path} is incomplete ({len(store.missing_rows())} rows unwritten)"
        )
    rows = store.row_ids
    if store.candidates is None and store.num_rows != num_rows:
        raise BadInputError(
            f"--scores {path} has {store.num_rows} rows but this run's dataset has {num_rows}: "
            "score the same --dataset/--split (and --chunk_length/--max_tokens) as the earlier run"
        )
    if store.candidates is not None:
        if len(rows) != store.num_rows:
            raise StoreError(f"{path / CANDIDATES_NPY} names {len(rows)} rows for {store.num_rows}")
        if len(rows) and (rows.min() < 0 or rows.max() >= num_rows):
            raise BadInputError(
                f"--scores {path} is a candidate run naming row {int(rows.max())}, but this "
                f"run's dataset has {num_rows} rows"
            )
    return np.asarray(store.scores, dtype=np.float64), rows, store


def earlier_higher_is_better(cfg: CandidateConfig, store: ScoreStore) -> bool:
    """``--candidates.higher_is_better``, else what the earlier run's config.yaml says."""
    if cfg.higher_is_better is not None:
        return bool(cfg.higher_is_better)
    found = store.higher_is_better
    if found is None:
        raise BadInputError(
            f"--scores {cfg.scores} has no config.yaml saying whether higher scores are better; "
            "set --candidates.higher_is_better"
        )
    return found


def record_rows(path: Path, direction: str, top_k: int, num_rows: int) -> np.ndarray:
    """Sorted union, over the queries of a ``query --record`` CSV, of each query's first
    ``top_k`` recorded rows (all when 0) at ``direction``'s end (bergson's ``Top`` /
    ``Bottom``, ours ``top`` / ``bottom``; repeated sessions append in file order)."""
    want = "top" if direction == "proponents" else "bottom"
    kept: dict[str, list[int]] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"query", "direction", "result_index"} - set(reader.fieldnames or [])
            if missing:
                raise BadInputError(
                    f"--scores {path} is not a query --record CSV (no {', '.join(sorted(missing))} column)"
                )
            for line in reader:
                if str(line["direction"]).strip().lower() == want:
                    kept.setdefault(line["query"], []).append(int(line["result_index"]))
    except OSError as e:
        raise BadInputError(f"cannot read --scores {path}: {e.strerror or e}") from None
    except ValueError as e:
        if isinstance(e, BadInputError):
            raise
        raise BadInputError(f"--scores {path} has a result_index that is not a row number: {e}") from None
    if not kept:
        raise BadInputError(f"--scores {path} records no {want} results")
    rows = np.unique(
        np.asarray([r for per in kept.values() for r in per[: top_k or None]], dtype=np.int64)
    )
    if rows[0] < 0 or rows[-1] >= num_rows:
        raise BadInputError(
            f"--scores {path} refers to row {int(rows[-1] if rows[-1] >= num_rows else rows[0])}; "
            f"this run's dataset has {num_rows} rows"
        )
    return rows


def select_candidates(cfg: CandidateConfig, num_rows: int) -> np.ndarray:
    """The dataset rows to rescore (int64, ascending) for a dataset of ``num_rows`` rows."""
    path = Path(cfg.scores).expanduser()
    if not path.exists():
        raise BadInputError(f"--scores {path} does not exist")
    if cfg.from_record:
        if cfg.fraction > 0:
            raise BadInputError("--fraction does not apply to a query --record CSV; use --top_k")
        return record_rows(path, cfg.direction, cfg.top_k, num_rows)
    scores, rows, store = _earlier_scores(path, num_rows)
    count = candidate_count(cfg.top_k, cfg.fraction, len(rows))
    keep_high = earlier_higher_is_better(cfg, store) == (cfg.direction == "proponents")
    return np.unique(rows[keep_rows(scores, count, keep_high)])


def save_candidates(run_dir: str | Path, rows: np.ndarray) -> Path:
    """``candidates.npy`` beside the scores (int64, as bergson's ``np.save``)."""
    path = Path(run_dir) / CANDIDATES_NPY
    np.save(path, np.asarray(rows, dtype=np.int64), allow_pickle=False)
    return path


def load_candidates(run_dir: str | Path, num_rows: int) -> np.ndarray | None:
    """A run's ``candidates.npy`` (None without one), checked against ``num_rows``."""
    path = Path(run_dir) / CANDIDATES_NPY
    if not path.is_file():
        return None
    rows = np.load(path, allow_pickle=False)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise StoreError(f"{path} must hold a 1-D array of row numbers")
    rows = rows.astype(np.int64)
    if len(rows) and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= num_rows):
        raise StoreError(f"{path} must hold ascending, distinct rows below {num_rows}")
    return rows
