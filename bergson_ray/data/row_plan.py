"""Store rows that are not the dataset's rows one to one: ``--chunk_length``, ``--max_tokens``.

Normally store row ``i`` is dataset row ``i``. Two of bergson's data options change
that, and both need every document's token count before the first row is computed, so
the driver makes a :class:`RowPlan` once (:func:`plan_rows`) and ships it to the
workers, which then turn store rows into token sequences with it:

* ``--chunk_length L``: row ``k`` is the ``k``-th ``L``-token chunk of the EOS-joined
  stream of documents (``data/chunking.py``);
* ``--max_tokens T`` (bergson's experimental benchmarking cap): the rows are a prefix of
  the dataset holding at most ``T`` tokens or, when the whole dataset holds fewer, the
  dataset repeated (then a prefix of it) up to ``T`` tokens (:func:`select_max_tokens`).

Pure data code: no Ray, no model. The tokenizer and length limit come from the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bergson_ray.config import DataConfig
from bergson_ray.data.chunking import ChunkPlan, is_chunkable, token_ids
from bergson_ray.data.tokenize import TokenizedDoc, tokenize_rows
from bergson_ray.errors import BadInputError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

BLOCK = 2048
"""Dataset rows tokenized at a time while planning (memory stays flat)."""


@dataclass
class RowPlan:
    """How store rows map onto the dataset (small and picklable: it rides in the
    runner spec). Exactly one of ``source`` and ``chunks`` is set."""

    source: np.ndarray | None = None
    """int64 ``[rows]``: the dataset row of each store row (``--max_tokens``)."""
    chunks: ChunkPlan | None = None
    """The chunk layout (``--chunk_length``)."""

    def __len__(self) -> int:
        return len(self.chunks) if self.chunks is not None else len(self.source)

    def dataset_rows(self, idx: np.ndarray) -> np.ndarray:
        """Dataset rows of store rows ``idx`` (a ``source`` plan only)."""
        return self.source[np.asarray(idx, dtype=np.int64)]

    def view(self, ds: datasets.Dataset) -> datasets.Dataset | None:
        """The dataset's rows in store order (``--max_tokens``); None for chunks, whose rows
        are no dataset rows (their ``doc_ids`` say where they came from)."""
        return None if self.chunks is not None else ds.select(self.source)


def select_max_tokens(lengths: np.ndarray, max_tokens: int) -> np.ndarray:
    """bergson's ``--max_tokens``: the dataset rows to process, in order.

    With at least ``max_tokens`` tokens in the dataset: the longest prefix of rows whose
    lengths sum to at most ``max_tokens`` (it stops at the first row that would
    overflow). With fewer: the whole dataset ``max_tokens // total`` times, then a prefix
    of it by the same rule, so benchmarks process the requested number of tokens.
    Unlike bergson, which then keeps the whole dataset, no row fitting is an error.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total <= 0:
        raise BadInputError("--max_tokens: the dataset's documents hold no tokens")
    repeats = 0 if total >= max_tokens else max_tokens // total
    budget = max_tokens - repeats * total
    # the prefix: rows up to (not including) the first one whose running sum overflows
    over = np.flatnonzero(np.cumsum(lengths) > budget)
    prefix = int(over[0]) if over.size else len(lengths)
    if repeats == 0 and prefix == 0:
        raise BadInputError(
            f"--max_tokens {max_tokens} is smaller than the first document "
            f"({int(lengths[0])} tokens), so no document fits"
        )
    rows = np.concatenate([np.tile(np.arange(len(lengths)), repeats), np.arange(prefix)])
    log.info(
        "--max_tokens %d: %d rows (%s), %d tokens", max_tokens, len(rows),
        f"the dataset x{repeats} and a prefix" if repeats else "a prefix",
        repeats * total + int(lengths[:prefix].sum()),
    )
    return rows.astype(np.int64)


def document_lengths(
    ds: datasets.Dataset, cfg: DataConfig, tokenizer, max_length: int | None
) -> np.ndarray:
    """Token count of every row, tokenized exactly as the workers will."""
    from bergson_ray.data.loading import needed_columns

    ds = ds.select_columns(needed_columns(cfg))
    out = np.zeros(len(ds), dtype=np.int64)
    for lo in range(0, len(ds), BLOCK):
        rows = ds[lo : lo + BLOCK]
        ids = list(range(lo, min(lo + BLOCK, len(ds))))
        docs = tokenize_rows(rows, tokenizer, cfg, max_length, row_ids=ids)
        out[lo : lo + len(docs)] = [len(d) for d in docs]
    return out


def plan_chunks(
    ds: datasets.Dataset, cfg: DataConfig, tokenizer, max_length: int | None
) -> ChunkPlan:
    """Count every document's tokens and lay out the chunks (``--chunk_length``)."""
    length = cfg.chunk_length
    if max_length is not None and length > max_length:
        raise BadInputError(
            f"--chunk_length {length} exceeds the model's maximum context length {max_length}"
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise BadInputError("--chunk_length needs a tokenizer with an EOS token to join documents")
    col = cfg.prompt_column
    rows: list[np.ndarray] = []
    counts: list[int] = []
    for lo in range(0, len(ds), BLOCK):
        texts = ds[lo : lo + BLOCK][col]
        keep = [i for i, t in enumerate(texts) if is_chunkable(t)]
        rows.append(np.asarray(keep, dtype=np.int64) + lo)
        counts.extend(len(ids) for ids in token_ids(tokenizer, [texts[i] for i in keep]))
    doc_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    plan = ChunkPlan.from_counts(doc_rows, np.asarray(counts, np.int64), length, eos)
    if plan.num_chunks == 0:
        raise BadInputError(
            f"--chunk_length {length}: the dataset's {int(plan.starts[-1])} tokens "
            "(EOS included) do not fill a single chunk"
        )
    if len(doc_rows) < len(ds):
        log.warning(
            "--chunk_length: %d of %d documents are empty and left out", len(ds) - len(doc_rows), len(ds)
        )
    log.info(
        "--chunk_length %d: %d documents -> %d chunks (%d tail tokens dropped)",
        length, len(doc_rows), plan.num_chunks, int(plan.starts[-1]) - plan.num_chunks * length,
    )
    return plan


def plan_rows(
    ds: datasets.Dataset, cfg: DataConfig, tokenizer, max_length: int | None
) -> RowPlan | None:
    """The plan for ``cfg``'s chunking or token cap, or None when rows map one to one.

    ``max_length`` is the workers' document length limit (the model's context, or the
    token budget with ``--truncation``).
    """
    if cfg.chunk_length:
        return RowPlan(chunks=plan_chunks(ds, cfg, tokenizer, max_length))
    if cfg.max_tokens is not None:
        lengths = document_lengths(ds, cfg, tokenizer, max_length)
        return RowPlan(source=select_max_tokens(lengths, cfg.max_tokens))
    return None


def chunk_docs(
    plan: ChunkPlan,
    idx: np.ndarray,
    read_rows: Callable[[np.ndarray], dict[str, list]],
    tokenizer,
    cfg: DataConfig,
) -> list[TokenizedDoc]:
    """The chunks ``idx`` as documents: every token is a prediction target.

    ``read_rows(dataset_rows)`` returns those rows' columns (``DatasetRows.rows``).
    """

    def tokens(positions: np.ndarray) -> list[list[int]]:
        texts = read_rows(plan.doc_rows[positions])[cfg.prompt_column] if len(positions) else []
        return token_ids(tokenizer, texts)

    ids = plan.assemble([int(k) for k in np.asarray(idx).reshape(-1)], tokens)
    return [TokenizedDoc(input_ids=row, labels=row.copy()) for row in ids]


def chunk_table(plan: ChunkPlan, length: np.ndarray, loss: np.ndarray) -> datasets.Dataset:
    """``data.hf`` of a chunked store, bergson's columns: ``doc_ids`` (``[L]`` per chunk),
    ``length`` and ``loss``. Built block by block as Arrow arrays (no Python lists)."""
    import datasets
    import pyarrow as pa

    n, width = len(plan), plan.chunk_length
    blocks = []
    for lo in range(0, n, BLOCK):
        ids = plan.doc_ids(np.arange(lo, min(lo + BLOCK, n)))
        offsets = np.arange(len(ids) + 1, dtype=np.int32) * width
        blocks.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.reshape(-1))))
    doc_ids = pa.concat_arrays(blocks) if blocks else pa.array([], pa.list_(pa.int64()))
    table = pa.table(
        {
            "doc_ids": doc_ids,
            "length": pa.array(np.asarray(length, dtype=np.int64)),
            "loss": pa.array(np.asarray(loss, dtype=np.float32)),
        }
    )
    return datasets.Dataset(table)
