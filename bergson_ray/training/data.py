"""The training stream: documents tokenized once, then batched in bergson's order.

A worker that retrains many times (leave-k-out, metasmoothness) builds one
:class:`TokenizedData` and calls :func:`~bergson_ray.training.loop.train` on it again
and again with different weights; nothing here depends on the weights.

The order is bergson 2.5.1's exactly: the documents (in dataset order) are shuffled
once per epoch with ``numpy.random.default_rng(seed + epoch).permutation`` (what
``datasets.Dataset.shuffle(seed=...)`` draws), the epochs are concatenated, and the
stream is padded to a multiple of ``batch_size`` with copies of its last row whose
weight is 0. The copies still count in a ``mean`` loss's token denominator, as in
bergson.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..config.sections import DataConfig
from ..errors import BadInputError

IGNORE_INDEX = -100


@dataclass
class TokenizedData:
    """Documents as token ids plus HF-style labels (``-100`` = not a target)."""

    input_ids: list[Tensor]
    """int64 ``[L_i]`` per document."""
    labels: list[Tensor]
    """int64 ``[L_i]``; ``labels[t]`` is scored by the logits at position ``t - 1``."""

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise BadInputError("TokenizedData needs one labels tensor per document")
        for ids, lab in zip(self.input_ids, self.labels):
            if ids.shape != lab.shape:
                raise BadInputError("each document's labels must match its input_ids in length")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def max_length(self) -> int:
        """Length of the longest document (the width per-token weights need)."""
        return max((int(x.numel()) for x in self.input_ids), default=0)

    @classmethod
    def from_ids(cls, docs: list[list[int]] | list[Tensor]) -> TokenizedData:
        """Plain language-modelling data: every token is a target."""
        ids = [torch.as_tensor(d, dtype=torch.long) for d in docs]
        return cls(ids, [x.clone() for x in ids])

    @classmethod
    def from_docs(cls, docs: list) -> TokenizedData:
        """From ``bergson_ray.data.tokenize.TokenizedDoc`` objects."""
        return cls(
            [torch.as_tensor(d.input_ids, dtype=torch.long) for d in docs],
            [torch.as_tensor(d.labels, dtype=torch.long) for d in docs],
        )

    def subset(self, indices: list[int]) -> TokenizedData:
        """The documents at ``indices``, in that order."""
        return TokenizedData([self.input_ids[i] for i in indices], [self.labels[i] for i in indices])


@dataclass(frozen=True)
class Batch:
    """One optimizer step's documents; the last ``pad`` rows are weight-0 fillers."""

    rows: tuple[int, ...]
    pad: int = 0


def batch_order(num_docs: int, batch_size: int, num_epochs: int, seed: int) -> list[Batch]:
    """Every optimizer step's document indices, in bergson's order (see module doc)."""
    if num_docs < 1:
        raise BadInputError("the training data has no documents")
    stream = np.concatenate(
        [np.random.default_rng(seed + e).permutation(num_docs) for e in range(num_epochs)]
    ).tolist()
    pad = (-len(stream)) % batch_size
    stream += [stream[-1]] * pad
    batches = []
    for start in range(0, len(stream), batch_size):
        end = start + batch_size
        batches.append(Batch(tuple(stream[start:end]), max(0, end - (len(stream) - pad))))
    return batches


def collate(data: TokenizedData, rows: tuple[int, ...] | list[int]) -> tuple[Tensor, Tensor]:
    """Right-pad the rows' ids with 0 and labels with -100 to the longest row.

    No attention mask, as bergson: under causal attention the trailing pad tokens never
    reach a real position, and their labels are ignored.
    """
    width = max(int(data.input_ids[r].numel()) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        n = int(data.input_ids[r].numel())
        ids[i, :n] = data.input_ids[r]
        labels[i, :n] = data.labels[r]
    return ids, labels


def load_tokenized(
    data_cfg: DataConfig, tokenizer, *, max_length: int | None = None, chunk: int = 1024
) -> TokenizedData:
    """Read ``data_cfg``'s dataset and tokenize every row (in dataset order).

    ``max_length``: longer documents are cut with ``--truncation``, else rejected.
    """
    from ..data.loading import check_columns, load_dataset_rows, needed_columns
    from ..data.tokenize import tokenize_rows

    if data_cfg.reward_column:
        raise BadInputError("train does not support --reward_column (advantage-weighted loss)")
    if data_cfg.advantage_column:
        raise BadInputError("train does not support --advantage_column (advantage-weighted loss)")
    ds = load_dataset_rows(data_cfg)
    check_columns(ds.column_names, data_cfg)
    ds = ds.select_columns(needed_columns(data_cfg))
    docs: list = []
    for start in range(0, len(ds), chunk):
        rows = ds[start : start + chunk]
        ids = list(range(start, start + len(next(iter(rows.values())))))
        docs.extend(tokenize_rows(rows, tokenizer, data_cfg, max_length, row_ids=ids))
    if not docs:
        raise BadInputError(f"dataset {data_cfg.dataset!r} (split {data_cfg.split!r}) is empty")
    return TokenizedData.from_docs(docs)
