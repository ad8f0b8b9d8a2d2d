"""The text of the training documents behind a score store's rows.

Where it comes from, first match wins (as for ``score --top_k`` and the query side):

1. the ``data.hf`` a score run saves beside its scores, when it kept the text column;
2. the dataset its ``config.yaml`` names (the store's own, else the enclosing run's,
   e.g. ``magic``'s ``RUN/config.yaml`` for ``RUN/scores``), opened like every command
   opens data (``data/loading.py``: memory-mapped, so only the shown rows are read).

Text is a nicety: when neither is available the report says why and shows none.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import deque
from pathlib import Path
from typing import Any

from ..store.files import read_yaml

log = logging.getLogger(__name__)

DATA_HF = "data.hf"
CONFIG_YAML = "config.yaml"


def find_data_section(doc: Any) -> dict[str, Any] | None:
    """The shallowest ``data`` mapping that names a ``dataset`` (ours: ``steps[0].<cmd>
    .data``; bergson's score: ``steps[0].score.index_cfg.data``)."""
    queue: deque[Any] = deque([doc])
    while queue:
        cur = queue.popleft()
        if isinstance(cur, dict):
            data = cur.get("data")
            if isinstance(data, dict) and data.get("dataset"):
                return data
            queue.extend(cur.values())
        elif isinstance(cur, list):
            queue.extend(cur)
    return None


def _config_data(dirs: list[Path]) -> tuple[dict[str, Any] | None, Path | None]:
    for d in dirs:
        path = d / CONFIG_YAML
        if path.is_file():
            try:
                section = find_data_section(read_yaml(path))
            except Exception as err:  # noqa: BLE001 - a broken config only costs the text
                log.warning("cannot read %s: %s", path, err)
                continue
            if section is not None:
                return section, path
    return None, None


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):  # conversation
        return "\n".join(f"{m.get('role', '?')}: {as_text(m.get('content', ''))}" for m in value)
    return json.dumps(value, ensure_ascii=False, default=str)


class RowTexts:
    """``text(row)`` for dataset rows of a score store; ``source`` says where it came
    from, or why there is none."""

    def __init__(self, score_dir: Path, search: list[Path] | None = None):
        self.dataset: Any = None
        self.columns: list[str] = []
        self.source = ""
        dirs = [score_dir, *(search or [])]
        section, where = _config_data(dirs)
        wanted = self._wanted(section)
        if self._try_data_hf(score_dir / DATA_HF, wanted):
            return
        if section is None:
            self.source = (
                f"no text: {score_dir / DATA_HF} has no {wanted[0]!r} column and no "
                "config.yaml names the dataset"
            )
            return
        self._try_config(section, where, wanted)

    @staticmethod
    def _wanted(section: dict[str, Any] | None) -> list[str]:
        s = section or {}
        cols = [s.get("prompt_column") or "text", s.get("completion_column") or "",
                s.get("conversation_column") or ""]
        return [c for c in dict.fromkeys(cols) if c]

    def _use(self, ds: Any, wanted: list[str]) -> bool:
        cols = [c for c in wanted if c in ds.column_names]
        if not cols:
            return False
        self.dataset, self.columns = ds, cols
        return True

    def _try_data_hf(self, path: Path, wanted: list[str]) -> bool:
        if not path.is_dir():
            return False
        try:
            import datasets

            ds = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001
            log.warning("cannot open %s: %s", path, err)
            return False
        if self._use(ds, wanted):
            self.source = f"text from {path}"
            return True
        return False

    def _try_config(self, section: dict[str, Any], where: Path | None, wanted: list[str]) -> None:
        from ..config.coerce import from_dict
        from ..config.sections import DataConfig
        from ..data.loading import load_dataset_rows

        names = {f.name for f in dataclasses.fields(DataConfig)}
        try:
            cfg = from_dict(DataConfig, {k: v for k, v in section.items() if k in names})
            ds = load_dataset_rows(cfg)
        except Exception as err:  # noqa: BLE001 - text is a nicety; never fatal
            self.source = f"no text: cannot open the dataset {section.get('dataset')!r} named in {where} ({err})"
            return
        if self._use(ds, wanted):
            self.source = f"text from the dataset {section.get('dataset')!r} named in {where}"
        else:
            self.source = f"no text: the dataset named in {where} has none of the columns {wanted}"

    def texts(self, rows: list[int]) -> list[str | None]:
        """Text of each dataset row (``None`` when there is no text or the row is out of range)."""
        if self.dataset is None:
            return [None] * len(rows)
        n = len(self.dataset)
        valid = sorted({int(r) for r in rows if 0 <= int(r) < n})
        if not valid:
            return [None] * len(rows)
        picked = self.dataset.select_columns(self.columns)[valid]
        by_row = {
            r: "\n".join(as_text(picked[c][j]) for c in self.columns) for j, r in enumerate(valid)
        }
        return [by_row.get(int(r)) for r in rows]
