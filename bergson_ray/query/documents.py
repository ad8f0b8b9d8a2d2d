"""The text of the documents behind store rows, for showing search hits to people.

Where the text comes from, first match wins:

1. the store's own ``data.hf`` when the build kept the text column (``--drop_columns false``);
2. the dataset the store was built from (its ``config.yaml``), memory-mapped, read row
   by row, so a million-row corpus costs no memory.

Per-token stores: a row is a token; its document is ``searchsorted(offsets, row)``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from .store_spec import StoreSpec

log = logging.getLogger(__name__)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


class DocumentLookup:
    """Maps global row ids to document ids and text (``None`` where no text is available)."""

    def __init__(self, spec: StoreSpec, text_field: str = "text"):
        self.spec = spec
        self.offsets = getattr(spec.store, "offsets", None)
        self.columns: list[str] = []
        self.dataset = self._open(spec, text_field)

    def _open(self, spec: StoreSpec, text_field: str):
        data = spec.store.data
        wanted = [text_field]
        build = spec.build
        if build is not None:
            d = build.data
            wanted += [d.prompt_column, d.completion_column, d.conversation_column]
        wanted = [w for w in dict.fromkeys(wanted) if w]
        if data is not None:
            cols = [c for c in wanted if c in data.column_names]
            if cols:
                self.columns = cols[:1] if cols[0] == text_field else cols
                return data
        if build is not None and build.data.dataset:  # a callback store may name none
            try:
                from ..data.loading import load_dataset_rows

                ds = load_dataset_rows(build.data)
            except Exception as err:  # noqa: BLE001 - text is a nicety; never fatal
                log.warning("cannot open the store's dataset for document text: %s", err)
                return None
            cols = [c for c in wanted if c in ds.column_names]
            if cols and len(ds) == spec.store.num_items:
                self.columns = cols[:1] if cols[0] == text_field else cols
                return ds
        log.warning(
            "no %r text for store %s: hits come back without text "
            "(build with --drop_columns false to keep it)",
            text_field,
            spec.path,
        )
        return None

    def doc_ids(self, row_ids: np.ndarray) -> np.ndarray:
        """Document (item) id of each row id; ``-1`` stays ``-1``."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        if self.offsets is None:
            return row_ids
        docs = np.searchsorted(self.offsets, row_ids, side="right") - 1
        return np.where(row_ids < 0, -1, docs)

    def texts(self, row_ids: np.ndarray) -> list[str | None]:
        """Text of each row's document, in order (``None`` for missing hits or no text)."""
        docs = self.doc_ids(row_ids).reshape(-1)
        if self.dataset is None:
            return [None] * len(docs)
        valid = sorted({int(d) for d in docs if d >= 0})
        if not valid:
            return [None] * len(docs)
        rows = self.dataset.select_columns(self.columns)[valid]
        by_doc: dict[int, str] = {}
        for j, d in enumerate(valid):
            parts = [_as_text(rows[c][j]) for c in self.columns]
            by_doc[d] = parts[0] if len(parts) == 1 else "\n".join(parts)
        return [by_doc.get(int(d)) for d in docs]
