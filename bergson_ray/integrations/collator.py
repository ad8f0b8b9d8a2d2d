"""Thread each training example's dataset index (``_idx``) through the data pipeline.

A gradient row must land at its example's index whatever the sampler does (shuffling,
distributed sharding, length grouping). So the dataset gets an ``_idx`` column, the
collator strips it from the features before the user's collator sees them and adds it
back as one ``int64`` tensor, and the callback's forward pre-hook pops it before the
model's ``forward`` sees it (``hf_callback.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import BadInputError

IDX = "_idx"
"""Name of the index column and of the batch key that carries it."""

PREPARED_FLAG = "_bergson_ray_gradient_collection"
"""Attribute set on ``TrainingArguments`` by :func:`prepare_for_gradient_collection`."""


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset of mappings, each item extended with its own index."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if not isinstance(item, Mapping):
            raise BadInputError(
                f"gradient collection needs dataset items that are mappings, got {type(item).__name__}"
            )
        return {**item, IDX: int(i)}


class IndexCollator:
    """Wraps a collator: ``_idx`` goes around it, not through it.

    A class (not a closure) so DataLoader workers started with ``spawn`` can pickle it.
    Batches without ``_idx`` (evaluation) pass through unchanged.
    """

    def __init__(self, inner: Callable[[list], Any]):
        self.inner = inner

    def __call__(self, features: list) -> Any:
        if not features or not isinstance(features[0], Mapping) or IDX not in features[0]:
            return self.inner(features)
        idx = torch.tensor([int(f[IDX]) for f in features], dtype=torch.long)
        batch = self.inner([{k: v for k, v in f.items() if k != IDX} for f in features])
        if not isinstance(batch, dict) and not hasattr(batch, "__setitem__"):
            raise BadInputError(
                f"the data collator returned a {type(batch).__name__}; gradient collection "
                "needs a dict-like batch to carry _idx"
            )
        batch[IDX] = idx
        return batch


def with_index(dataset: Any) -> Any:
    """``dataset`` with an ``_idx`` column holding ``0..n-1`` (a HF ``Dataset`` gets a real
    column, anything else the :class:`IndexedDataset` wrapper)."""
    if dataset is None:
        raise BadInputError("the trainer has no train_dataset to collect gradients for")
    if isinstance(dataset, IndexedDataset):
        return dataset
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a hard dependency
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.IterableDataset):
        raise BadInputError(
            "gradient collection needs a map-style train_dataset with a length, not an "
            "IterableDataset (rows are written at their dataset index)"
        )
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        if IDX in dataset.column_names:
            existing = dataset[IDX]
            if list(existing) != list(range(len(dataset))):
                raise BadInputError(
                    f"train_dataset already has a column {IDX!r} that is not 0..n-1; rename it"
                )
            return dataset
        import numpy as np

        return dataset.add_column(IDX, np.arange(len(dataset), dtype=np.int64))
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise BadInputError(
            "gradient collection needs a map-style train_dataset (with __len__ and __getitem__)"
        )
    return IndexedDataset(dataset)


def prepare_for_gradient_collection(trainer: Any) -> Any:
    """Make ``trainer`` carry dataset indices to :class:`GradientCollectorCallback`.

    Mutates and returns ``trainer``: the train dataset gets an ``_idx`` column, the model
    signature columns keep it (``remove_unused_columns`` would drop it), and the collator
    is wrapped in :class:`IndexCollator`. Call it once, before ``trainer.train()``.
    """
    trainer.train_dataset = with_index(trainer.train_dataset)
    if hasattr(trainer, "_set_signature_columns_if_needed"):
        trainer._set_signature_columns_if_needed()
        cols = trainer._signature_columns
        if cols is not None and IDX not in cols:
            cols.append(IDX)
    collator = trainer.data_collator
    if collator is None:
        from transformers import default_data_collator

        collator = default_data_collator
    if not isinstance(collator, IndexCollator):
        trainer.data_collator = IndexCollator(collator)
    setattr(trainer.args, PREPARED_FLAG, True)
    return trainer
