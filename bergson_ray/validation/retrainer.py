"""One process's retraining engine: the data and base weights loaded once, then any
number of retrains with different document weights (no Ray here).

``RetrainSpec`` is what travels to a worker (plain configs, picklable); ``build()`` makes
the :class:`Retrainer` in the worker. bergson's leave-k-out retrain keeps every document
in its batch and sets the left-out documents' *weights* to ``subset_weight`` (0 by
default), so batch composition, step count and the loss denominator are those of the base
run; the trainer in ``bergson_ray/training`` has exactly these semantics.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config.sections import DataConfig, ModelConfig
from ..config.training import TrainingConfig
from ..errors import BadInputError
from .bank import commit_model_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataShape:
    """What the driver needs to know about the data before planning any retrain."""

    num_train_docs: int
    num_query_docs: int
    query_tokens: np.ndarray


@dataclass(frozen=True)
class RetrainSpec:
    """Everything a worker needs to rebuild the :class:`Retrainer` (sent once per actor)."""

    model: ModelConfig
    data: DataConfig
    query: DataConfig
    train: TrainingConfig
    eval_batch_size: int = 16
    torch_threads: int = 0

    def build(self) -> Retrainer:
        return Retrainer(self)

    def count_docs(self) -> tuple[int, int]:
        """``(training docs, query docs)`` from the datasets alone (memory-mapped, no
        tokenizing), so the driver rejects mismatched scores before any worker starts;
        a query set without its text column fails here too."""
        from ..data.loading import check_columns, load_dataset_rows

        counts = []
        for cfg in (self.data, self.query):
            ds = load_dataset_rows(cfg)
            check_columns(ds.column_names, cfg)
            counts.append(len(ds))
        return counts[0], counts[1]


def _supervised_tokens(data) -> np.ndarray:
    """Loss-bearing tokens per document (labels shifted by one, -100 ignored)."""
    labels = getattr(data, "labels", None)
    if labels is None:
        raise BadInputError("the tokenized query set carries no labels to count tokens with")
    return np.array([int((torch.as_tensor(row)[1:] != -100).sum()) for row in labels], dtype=np.int64)


class Retrainer:
    """Holds the tokenized training and query sets, the model and its base parameters."""

    def __init__(self, spec: RetrainSpec):
        from ..training import initial_params, load_tokenized, make_model
        from ..training.model import max_model_length

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.model, self.tokenizer = make_model(spec.model)
        limit = max_model_length(self.model, self.tokenizer)
        self.train_data = load_tokenized(spec.data, self.tokenizer, max_length=limit)
        self.query_data = load_tokenized(spec.query, self.tokenizer, max_length=limit)
        self.base = {k: v.detach().clone() for k, v in initial_params(self.model).items()}

    def shape(self) -> DataShape:
        return DataShape(
            len(self.train_data), len(self.query_data), _supervised_tokens(self.query_data)
        )

    def retrain(self, weights: np.ndarray | None) -> dict[str, torch.Tensor]:
        """Train from the base parameters with per-document ``weights`` (None = all ones)."""
        from ..training import train

        w = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float32))
        result = train(
            self.model, self.train_data, self.spec.train, w, params=dict(self.base),
            num_threads=self.spec.torch_threads or None,
        )
        return {k: v.detach() for k, v in result.params.items()}

    def query_losses(self, params: dict[str, torch.Tensor]) -> np.ndarray:
        """Each query document's mean token loss under ``params``."""
        from ..training import doc_losses

        with torch.no_grad():
            out = doc_losses(self.model, params, self.query_data, self.spec.eval_batch_size)
        return out.detach().double().cpu().numpy()

    def save(self, params: dict[str, torch.Tensor], final: Path) -> None:
        """Write ``params`` as a Hugging Face model dir (with the tokenizer), atomically."""
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in params.items():
                named[k].copy_(v)
            try:
                self.model.save_pretrained(str(tmp), safe_serialization=True)
            finally:
                for k, v in self.base.items():
                    named[k].copy_(v)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(tmp))
        commit_model_dir(tmp, final)

    def load(self, model_dir: Path) -> dict[str, torch.Tensor]:
        """Parameters of a banked model (ours or bergson's HF dir) by our parameter names."""
        from transformers import AutoModelForCausalLM

        from ..utils.quiet import quiet_model_loading

        quiet_model_loading()
        m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        params = dict(m.named_parameters())
        missing = sorted(set(self.base) - set(params))
        if missing:
            raise BadInputError(
                f"bank model {model_dir} does not match --model: it lacks {missing[0]}"
            )
        return {k: params[k].detach() for k in self.base}
