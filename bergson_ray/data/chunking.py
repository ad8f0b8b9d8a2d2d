"""Pretraining-style rows: documents joined by EOS into one token stream, cut into chunks.

``--chunk_length L`` (bergson's ``DataConfig.chunk_length``) turns a text corpus into
rows of exactly ``L`` tokens: every non-empty document is tokenized without special
tokens, followed by one EOS, the documents are laid end to end in dataset order and the
stream is cut every ``L`` tokens; a last, partial chunk is dropped. Each chunk carries
``doc_ids`` (``[L]``: the dataset row each of its tokens came from, the EOS counting
for the document it closes) so that scores of chunks map back to documents.

Why a plan and not a materialized dataset: the driver only needs each document's token
count to know the row count and where every chunk starts (:class:`ChunkPlan`, two
integers per document); a worker asked for chunks ``k..`` re-reads and re-tokenizes just
the documents those chunks overlap (:meth:`ChunkPlan.assemble`). No token stream is ever
shipped through Ray or written to disk, and memory stays flat in corpus size.

One deliberate difference from bergson: bergson chunks inside ``datasets.map`` batches
(up to 10,000 documents each, fewer with several processes) and drops each batch's
partial tail; here the stream is one, so only the very last partial chunk is dropped.
The two agree whenever bergson processes the corpus as one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bergson_ray.errors import BadInputError


def is_chunkable(text: Any) -> bool:
    """Documents that take part in chunking: strings with non-whitespace content
    (bergson drops the others before tokenizing)."""
    return isinstance(text, str) and text.strip() != ""


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of ``texts`` exactly as chunking uses them: no special tokens, no cut.

    The driver (counting) and the workers (assembling) both call this, so a chunk's
    tokens are the ones its position in the stream was planned for.
    """
    if not texts:
        return []
    enc = tokenizer(
        list(texts),
        add_special_tokens=False,
        truncation=False,
        return_attention_mask=False,
        verbose=False,
    )
    return [list(ids) for ids in enc["input_ids"]]


def chunk_documents(
    docs: Sequence[Sequence[int]], doc_ids: Sequence[int], chunk_length: int, eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reference chunking of token lists: ``(input_ids [C, L], doc_ids [C, L])``.

    The straightforward definition (build the whole stream, cut it), used by tests and
    small callers; :class:`ChunkPlan` computes the same chunks without the stream.
    """
    stream: list[int] = []
    owner: list[int] = []
    for ids, d in zip(docs, doc_ids):
        stream.extend(int(t) for t in ids)
        stream.append(int(eos_id))
        owner.extend([int(d)] * (len(ids) + 1))
    c = len(stream) // chunk_length
    n = c * chunk_length
    return (
        np.asarray(stream[:n], dtype=np.int64).reshape(c, chunk_length),
        np.asarray(owner[:n], dtype=np.int64).reshape(c, chunk_length),
    )


@dataclass
class ChunkPlan:
    """Where every chunk of the stream starts, from each document's token count.

    Small and picklable: it travels to every worker inside the runner spec.
    """

    doc_rows: np.ndarray
    """int64 ``[D]``: dataset row of each chunked (non-empty) document, in stream order."""
    starts: np.ndarray
    """int64 ``[D + 1]``: stream offset of each document's first token; ``starts[-1]`` is
    the stream length (every document counts its tokens plus one EOS)."""
    chunk_length: int
    eos_id: int

    @classmethod
    def from_counts(
        cls, doc_rows: np.ndarray, token_counts: np.ndarray, chunk_length: int, eos_id: int
    ) -> ChunkPlan:
        """Plan from the token count of each document (without its EOS)."""
        counts = np.asarray(token_counts, dtype=np.int64) + 1
        starts = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        return cls(np.asarray(doc_rows, dtype=np.int64), starts, int(chunk_length), int(eos_id))

    @property
    def num_chunks(self) -> int:
        return int(self.starts[-1] // self.chunk_length)

    def __len__(self) -> int:
        return self.num_chunks

    def _span(self, k: int) -> tuple[int, int]:
        """Positions ``[lo, hi)`` (into ``doc_rows``) of the documents chunk ``k`` overlaps."""
        a, b = k * self.chunk_length, (k + 1) * self.chunk_length
        lo = int(np.searchsorted(self.starts, a, side="right")) - 1
        hi = int(np.searchsorted(self.starts, b, side="left"))
        return lo, hi

    def documents(self, chunks: Sequence[int]) -> np.ndarray:
        """Positions (into ``doc_rows``) of every document the given chunks overlap, sorted."""
        spans = [self._span(int(k)) for k in chunks]
        if not spans:
            return np.zeros(0, dtype=np.int64)
        return np.unique(np.concatenate([np.arange(lo, hi) for lo, hi in spans]))

    def doc_ids(self, chunks: Sequence[int]) -> np.ndarray:
        """int64 ``[len(chunks), L]``: the dataset row of every token of each chunk."""
        out = np.empty((len(chunks), self.chunk_length), dtype=np.int64)
        for r, k in enumerate(chunks):
            lo, hi = self._span(int(k))
            lens = np.diff(self.starts[lo : hi + 1])
            owner = np.repeat(self.doc_rows[lo:hi], lens)
            off = int(k) * self.chunk_length - int(self.starts[lo])
            out[r] = owner[off : off + self.chunk_length]
        return out

    def assemble(
        self, chunks: Sequence[int], tokens: Callable[[np.ndarray], list[list[int]]]
    ) -> np.ndarray:
        """int64 ``[len(chunks), L]``: the token ids of each chunk.

        ``tokens(positions)`` returns the token ids (no EOS) of the documents at those
        positions of ``doc_rows``; each must have the length the plan was made with.
        """
        positions = self.documents(chunks)
        got = tokens(positions)
        by_pos = dict(zip(positions.tolist(), got))
        for p, ids in by_pos.items():
            expected = int(self.starts[p + 1] - self.starts[p] - 1)
            if len(ids) != expected:
                raise BadInputError(
                    f"dataset row {int(self.doc_rows[p])} has {len(ids)} tokens here but "
                    f"{expected} when the chunks were planned: the dataset or tokenizer "
                    "differs between the driver and this worker"
                )
        out = np.empty((len(chunks), self.chunk_length), dtype=np.int64)
        for r, k in enumerate(chunks):
            lo, hi = self._span(int(k))
            seg: list[int] = []
            for p in range(lo, hi):
                seg.extend(by_pos[p])
                seg.append(self.eos_id)
            off = int(k) * self.chunk_length - int(self.starts[lo])
            out[r] = seg[off : off + self.chunk_length]
        return out
