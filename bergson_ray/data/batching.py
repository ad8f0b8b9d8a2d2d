"""Group documents into padded batches under a token budget.

Why a token budget instead of a fixed batch size: compute and memory of a padded batch
grow with ``max_len * n_docs``, so bounding that product keeps every forward/backward
pass about the same size whatever the length mix. Sorting longest first puts documents
of similar length together, which keeps padding (wasted compute) small. This is
bergson's packing rule (spec §6.2), minus the rank balancing that Ray makes unnecessary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bergson_ray.data.tokenize import IGNORE_INDEX, TokenizedDoc
from bergson_ray.errors import BadInputError


def pack_by_token_budget(
    lengths: Sequence[int], token_batch_size: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Positions into ``lengths`` grouped so that ``max_len * n_docs <= token_batch_size``.

    Greedy over documents sorted longest first (ties keep input order, so the result is
    deterministic). A document longer than the budget gets a batch of its own. Every
    position appears in exactly one batch.
    """
    if token_batch_size < 1:
        raise BadInputError(f"token_batch_size must be >= 1, got {token_batch_size}")
    if max_batch_size is not None and max_batch_size < 1:
        raise BadInputError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    order = np.argsort(-lens, kind="stable")
    batches: list[list[int]] = []
    current: list[int] = []
    current_max = 0
    for pos in order.tolist():
        n = len(current)
        fits = (n + 1) * current_max <= token_batch_size  # sorted: current_max >= this length
        if n and (not fits or (max_batch_size is not None and n >= max_batch_size)):
            batches.append(current)
            current = []
            n = 0
        if not n:
            current_max = int(lens[pos])
        current.append(pos)
    if current:
        batches.append(current)
    return batches


@dataclass
class PackedBatch:
    """Right-padded tensors for one forward/backward pass."""

    input_ids: torch.Tensor
    """int64 ``[N, S]``; padding is ``pad_id``."""
    labels: torch.Tensor
    """int64 ``[N, S]``; ``-100`` on padding and on non-target tokens."""
    lengths: torch.Tensor
    """int64 ``[N]``: real (unpadded) length of each document."""
    advantage: torch.Tensor
    """float32 ``[N]``: per-document loss weight."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            input_ids=self.input_ids.to(device),
            labels=self.labels.to(device),
            lengths=self.lengths.to(device),
            advantage=self.advantage.to(device),
        )


def collate(docs: list[TokenizedDoc], pad_id: int = 0) -> PackedBatch:
    """Stack documents into a right-padded :class:`PackedBatch` (no attention mask needed:
    with causal attention, right padding never influences real positions)."""
    if not docs:
        raise ValueError("collate needs at least one document")
    n = len(docs)
    width = max(len(d) for d in docs)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    for row, doc in enumerate(docs):
        length = len(doc)
        input_ids[row, :length] = doc.input_ids
        labels[row, :length] = doc.labels
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        lengths=torch.tensor([len(d) for d in docs], dtype=torch.int64),
        advantage=torch.tensor([d.advantage for d in docs], dtype=torch.float32),
    )
