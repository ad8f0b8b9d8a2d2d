"""One process's MAGIC engine: model, training and query data loaded once, then the
forward run (once per run) and any number of score columns (one reverse pass each).

``MagicSpec`` is what travels to a worker (plain configs, picklable); ``build()`` makes
the :class:`MagicEngine` there. Saved states live in a directory every worker can read
(``<run>/checkpoints``), so one worker trains and all of them replay. A column is
written to ``<columns>/q<j>.npy`` through a temporary file and ``os.replace``: a file
that exists is always complete, which is what resume and lost-worker recovery rely on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config.sections import DataConfig, ModelConfig
from ..config.training import TrainingConfig
from .query import check_query, query_gradient
from .replay import forward, initial_weights, reverse
from .states import StateStore
from .vjp import Recipe


def column_path(columns_dir: str | Path, job: int) -> Path:
    """Where score column ``job`` lives (query document ``job``, or 0 when aggregated)."""
    return Path(columns_dir) / f"q{job}.npy"


def write_column(path: Path, values: np.ndarray) -> None:
    """Atomic ``.npy`` write: temporary sibling, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, values, allow_pickle=False)
    os.replace(tmp, path)


def read_column(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


@dataclass(frozen=True)
class DataShape:
    """What the driver needs to lay out the score store."""

    num_train_docs: int
    num_query_docs: int
    lengths: tuple[int, ...]
    """Training document lengths in tokens (per-token rows are ``length - 1`` each)."""


@dataclass(frozen=True)
class MagicSpec:
    """Everything a worker needs to rebuild the engine (sent once per actor)."""

    model: ModelConfig
    data: DataConfig
    query: DataConfig
    training: TrainingConfig
    checkpoints: str
    columns: str
    aggregation: str = "none"
    attribute_tokens: bool = False
    double_backward_batch_size: int | None = None
    backward_save_every: int = 0
    torch_threads: int = 0

    def build(self) -> MagicEngine:
        return MagicEngine(self)


class MagicEngine:
    """Holds the recipe, the query set and the (shared, on-disk) saved states."""

    def __init__(self, spec: MagicSpec):
        from ..training import load_tokenized, make_model
        from ..training.model import max_model_length

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.model, self.tokenizer = make_model(spec.model)
        limit = max_model_length(self.model, self.tokenizer)
        data = load_tokenized(spec.data, self.tokenizer, max_length=limit)
        self.query = load_tokenized(spec.query, self.tokenizer, max_length=limit)
        check_query(self.query)
        self.recipe = Recipe(self.model, data, spec.training, spec.double_backward_batch_size)
        self.weights = initial_weights(self.recipe, spec.attribute_tokens)
        self.store = StateStore(spec.checkpoints)

    def shape(self) -> DataShape:
        data = self.recipe.data
        return DataShape(len(data), len(self.query), tuple(int(x.numel()) for x in data.input_ids))

    def train_once(self) -> bool:
        """The forward run, unless its final state is already saved; True if it ran."""
        if self.store.has_final():
            return False
        forward(self.recipe, self.weights, self.store)
        return True

    def final_params(self) -> dict[str, torch.Tensor]:
        return self.store.load_final().params

    def jobs(self) -> list[int]:
        """Score columns of this run: one per query document, or one in total."""
        return list(range(len(self.query))) if self.spec.aggregation == "none" else [0]

    def column(self, job: int) -> np.ndarray:
        """One reverse pass: the scores of column ``job`` (float32, weights' shape)."""
        final = self.store.load_final()
        query = job if self.spec.aggregation == "none" else None
        cot, _ = query_gradient(self.model, final.params, self.query, self.spec.aggregation, query)
        backward = Path(self.spec.checkpoints) / f"backward_q{job}.safetensors"
        scores = reverse(
            self.recipe, self.store, cot, self.weights,
            backward_path=backward, save_every=self.spec.backward_save_every,
        )
        return scores.float().numpy()
