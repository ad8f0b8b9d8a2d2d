"""Reading a score store (ours or bergson's, bergson-spec §2.4) and the sign convention
recorded in its run's ``config.yaml``; layout in :mod:`bergson_ray.store.score_layout`."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from bergson_ray.errors import StoreError
from bergson_ray.store.elements import to_float32
from bergson_ray.store.files import find_key, read_yaml
from bergson_ray.store.score_layout import ScoreFile

CANDIDATES_NPY = "candidates.npy"
CONFIG_YAML = "config.yaml"


def read_higher_is_better(run_dir: str | Path) -> bool | None:
    """``score_cfg.higher_is_better`` from a run's ``config.yaml`` (bergson's layout:
    ``steps: [{<command>: {score_cfg: {...}}}]``), else the shallowest
    ``higher_is_better`` anywhere in it; None without a config or the key."""
    path = Path(run_dir) / CONFIG_YAML
    if not path.is_file():
        return None
    doc = read_yaml(path)
    steps = doc.get("steps") if isinstance(doc, dict) else None
    for step in steps if isinstance(steps, list) else []:
        for body in step.values() if isinstance(step, dict) else []:
            score_cfg = body.get("score_cfg") if isinstance(body, dict) else None
            if isinstance(score_cfg, dict) and "higher_is_better" in score_cfg:
                return bool(score_cfg["higher_is_better"])
    value = find_key(doc, "higher_is_better")
    return None if value is None else bool(value)


class ScoreStore(ScoreFile):
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
