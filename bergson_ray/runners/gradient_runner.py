"""Rows of a dataset in, gradient rows out: the work one Ray worker does per batch.

``GradientRunner`` owns the model, tokenizer and engine for one worker process. It
reads the requested rows itself (workers receive only row indices through Ray
Data, so the driver never ships text), tokenizes, packs documents by token budget
(longest first, so padding stays small) and runs the engine batch by batch.

It knows nothing of Ray: the same object serves Ray Data workers
(``actors/batch_worker.py``), the ranks of an FSDP group (``runners/fsdp.py``), the
query actor and local single-process runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import BatchConfig, DataConfig, GradientConfig, ModelConfig, PreprocessConfig
from ..data.row_plan import RowPlan
from ..errors import BadInputError
from ..gradients.engine import BatchResult, GradientEngine
from ..gradients.losses import scale_logits
from ..gradients.normalizers import load_optimizer_normalizers
from ..utils.malloc import keep_freed_memory
from .model_loading import load_model, max_model_length
from .preprocess import RowPreprocessor

log = logging.getLogger(__name__)


@dataclass
class RunnerSpec:
    """Everything a worker needs to rebuild the engine; small and picklable."""

    model: ModelConfig
    grad: GradientConfig
    data: DataConfig
    batch: BatchConfig
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    skip_short_docs: bool = False
    device: str = "cpu"
    advantages: np.ndarray | None = None
    """Per-row advantage (GRPO), indexed by dataset row; computed once by the driver."""
    rows: RowPlan | None = None
    """Store rows -> dataset rows or chunks (``--max_tokens``, ``--chunk_length``); made
    once by the driver. None: store row i is dataset row i."""
    token_influence: str = "gradient"
    """``score --token_influence``: ``output`` scores each loss term along the query
    (``gradients/output_influence.py``) instead of scoring gradients."""


@dataclass(frozen=True)
class OneProcess:
    """Runner strategy of a Ray Data worker: the model lives in the worker's own process.

    (The other strategy, an FSDP group, is :class:`~bergson_ray.runners.sharded.GroupPlan`.)
    """

    torch_threads: int = 0

    def build(self, spec: RunnerSpec) -> GradientRunner:
        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)
        if spec.device == "auto":
            spec.device = "cuda" if torch.cuda.is_available() else "cpu"
        return GradientRunner(spec)


def score_columns(idx, loss, lengths, scores, per_token: bool) -> dict[str, np.ndarray]:
    """A batch's scores as worker output columns; per-token scores as one ragged object
    column (a document's [tokens, queries] rows) plus each document's token count."""
    out = {"idx": idx, "loss": loss, "length": lengths}
    if not per_token:
        out["scores"] = scores
        return out
    ragged = np.empty(len(scores), dtype=object)
    for i, r in enumerate(scores):
        ragged[i] = r
    out["scores"] = ragged
    out["token_count"] = np.maximum(lengths - 1, 0) * (lengths >= 2)
    return out


def numpy_rows(x: torch.Tensor) -> np.ndarray:
    """Tensor -> numpy without losing bf16 (shipped as its uint16 bit pattern)."""
    if x.dtype == torch.bfloat16:
        return x.contiguous().view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


class GradientRunner:
    """Loads the model once; turns row-index batches into per-document results."""

    def __init__(self, spec: RunnerSpec):
        from ..data.loading import DatasetRows

        keep_freed_memory()  # no page faults on the tensors every batch re-allocates
        self.spec = spec
        self.first_batch_wall: float | None = None
        """Wall time the first packed batch's gradients were done (``summary.json``)."""
        model, self.tokenizer = load_model(spec.model, spec.device)
        scale_logits(model, spec.grad.logit_scale)  # --logit_scale: a hook on the LM head
        normalizers = None
        if spec.grad.optimizer_state:
            from ..gradients.modules import find_target_modules

            mods = find_target_modules(model, spec.grad)
            normalizers = load_optimizer_normalizers(
                spec.grad.optimizer_state, model, mods, spec.grad.include_bias
            )
        self.engine = GradientEngine(model, spec.grad, normalizers=normalizers)
        self.source = DatasetRows(spec.data, planned=spec.rows is not None)
        limit = max_model_length(model, self.tokenizer)
        if spec.data.truncation:
            budget = spec.batch.token_batch_size
            limit = min(limit, budget) if limit else budget
        self.max_length = limit
        pre = RowPreprocessor(spec.preprocess, self.engine.grad_sizes, spec.device)
        self.postprocess: Callable[[torch.Tensor], torch.Tensor] | None = pre if pre.active else None
        if spec.batch.auto_batch_size:  # --auto_batch_size: this worker's largest budget
            from .auto_batch import tune_token_batch_size

            tune_token_batch_size(self)

    # -- pieces ------------------------------------------------------------------
    def tokenize(self, idx: np.ndarray) -> list:
        from ..data.tokenize import tokenize_rows

        plan = self.spec.rows
        if plan is not None and plan.chunks is not None:  # --chunk_length
            from ..data.row_plan import chunk_docs

            return chunk_docs(plan.chunks, idx, self.source.rows, self.tokenizer, self.spec.data)
        src = idx if plan is None else plan.dataset_rows(idx)  # --max_tokens may repeat rows
        rows = self.source.rows(src)
        docs = tokenize_rows(rows, self.tokenizer, self.spec.data, self.max_length)
        if self.spec.advantages is not None:
            for d, i in zip(docs, src):
                d.advantage = float(self.spec.advantages[int(i)])
        short = [int(i) for d, i in zip(docs, idx) if len(d.input_ids) < 2]
        if short and not self.spec.skip_short_docs:
            raise BadInputError(
                f"dataset row(s) {short[:10]} tokenize to fewer than 2 tokens, so they have no "
                "next-token loss and no gradient. Remove empty documents, or pass "
                "--skip_short_docs to store zero rows for them (bergson's behaviour)."
            )
        return docs

    def batches(self, docs: list) -> list[list[int]]:
        """Positions of documents with >= 2 tokens, packed by token budget."""
        from ..data.batching import pack_by_token_budget

        keep = [j for j, d in enumerate(docs) if len(d.input_ids) >= 2]
        plan = pack_by_token_budget(
            [len(docs[j].input_ids) for j in keep],
            self.spec.batch.token_batch_size,
            self.spec.batch.max_batch_size,
        )
        return [[keep[k] for k in b] for b in plan]

    def run_docs(self, docs: list):
        """Yield ``(positions, BatchResult)`` for every packed batch of ``docs``."""
        from ..data.batching import collate

        for positions in self.batches(docs):
            result = self.engine.compute(collate([docs[j] for j in positions]))
            if self.first_batch_wall is None:
                self.first_batch_wall = time.time()  # start-up breakdown: first gradients
            yield positions, result

    # -- the worker's job ----------------------------------------------------------
    streams_rows = True
    """:meth:`gradients` takes ``sink`` (the FSDP group's runner does not)."""

    def gradients(self, idx: np.ndarray, sink=None) -> dict[str, np.ndarray]:
        """Per-document gradient rows (or per-token rows) for dataset rows ``idx``.

        ``sink(positions, rows, counts)`` takes each packed batch's rows as soon as they
        exist; ``grads`` is then left out and no window-sized buffer is built (whole
        gradients of a small model: 64 rows are 200 MB). Per document, ``rows[j]`` is
        ``idx[positions[j]]``'s row, ``counts`` is None, and documents too short to have
        a gradient get zero rows. Per token, ``rows`` are the batch's token rows, document
        after document, ``counts[j]`` of them for ``idx[positions[j]]``.
        """
        idx = np.asarray(idx, dtype=np.int64)
        docs = self.tokenize(idx)
        n = len(idx)
        lengths = np.array([len(d.input_ids) for d in docs], dtype=np.int64)
        loss = np.zeros(n, dtype=np.float32)
        dtype = self.engine.store_dtype
        per_token = self.spec.grad.attribute_tokens
        if sink is None and per_token:
            token_rows: list = [np.zeros((0, self.engine.dim), np.float32)] * n
        elif sink is None:
            rows = torch.zeros(n, self.engine.dim, dtype=dtype)
        done = np.zeros(n, dtype=bool)
        for positions, res in self.run_docs(docs):
            loss[positions] = res.loss.numpy()
            if per_token:
                parts = self._token_parts(res)
                if sink is None:
                    for j, part in zip(positions, parts):
                        token_rows[j] = part
                else:
                    sink(np.asarray(positions), np.concatenate(parts), res.token_counts.numpy())
                continue
            r = res.rows
            if self.postprocess is not None:
                r = self.postprocess(r.float()).to(dtype)
            if sink is None:
                rows[positions] = r
            else:
                sink(np.asarray(positions), numpy_rows(r), None)
                done[positions] = True
        out = {"idx": idx, "loss": loss, "length": lengths}
        if per_token:
            out["token_count"] = np.maximum(lengths - 1, 0)
            if sink is None:  # one [count_i, D] array per document: a ragged column in Ray Data
                ragged = np.empty(n, dtype=object)
                for i, r in enumerate(token_rows):
                    ragged[i] = r
                out["grads"] = ragged
        elif sink is None:
            out["grads"] = numpy_rows(rows)
        elif not done.all():  # documents of < 2 tokens: zero rows, as bergson stores them
            short = np.flatnonzero(~done)
            sink(short, numpy_rows(torch.zeros(len(short), self.engine.dim, dtype=dtype)), None)
        return out

    def partial_sum(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """fp64 sum of the preprocessed rows of dataset rows ``idx`` (for ``reduce``)."""
        idx = np.asarray(idx, dtype=np.int64)
        docs = self.tokenize(idx)
        total = torch.zeros(self.engine.dim, dtype=torch.float64)
        loss = np.zeros(len(idx), dtype=np.float32)
        for positions, res in self.run_docs(docs):
            loss[positions] = res.loss.numpy()
            rows = res.rows.float()
            if self.postprocess is not None:
                rows = self.postprocess(rows)
            total += rows.sum(dim=0, dtype=torch.float64)
        lengths = np.array([len(d.input_ids) for d in docs], dtype=np.int64)
        return {"idx": idx, "loss": loss, "length": lengths, "sum": total.numpy()}

    def scores(
        self, idx: np.ndarray, query: torch.Tensor, mode: str, query_batch_size: int | None
    ) -> dict[str, np.ndarray]:
        """Scores of dataset rows ``idx`` against ``query``; gradients are never kept.

        Rows are preprocessed first (index side: ``H^{-1/2}`` and unit norm in cosine
        mode), then scored batch by batch. Per-token mode returns one ``[count, Q]``
        array per document.
        """
        from ..gradients.scoring import num_score_columns, score_rows

        if self.spec.token_influence == "output":
            return self.output_scores(idx, query, mode)
        idx = np.asarray(idx, dtype=np.int64)
        docs = self.tokenize(idx)
        n = len(idx)
        cols = num_score_columns(len(query), mode)
        lengths = np.array([len(d.input_ids) for d in docs], dtype=np.int64)
        loss = np.zeros(n, dtype=np.float32)
        per_token = self.spec.grad.attribute_tokens
        out_scores = (
            [np.zeros((0, cols), np.float32)] * n if per_token else np.zeros((n, cols), np.float32)
        )
        for positions, res in self.run_docs(docs):
            loss[positions] = res.loss.numpy()
            rows = res.token_rows if per_token else res.rows
            rows = rows.float()
            if self.postprocess is not None:
                rows = self.postprocess(rows)
            s = score_rows(rows, query, mode, query_batch_size).numpy()
            if per_token:
                start = 0
                for j, c in zip(positions, res.token_counts.tolist()):
                    out_scores[j] = s[start : start + c]
                    start += c
            else:
                out_scores[positions] = s
        return score_columns(idx, loss, lengths, out_scores, per_token)

    def output_scores(self, idx: np.ndarray, query: torch.Tensor, mode: str) -> dict[str, np.ndarray]:
        """:meth:`scores` with ``--token_influence output``: one forward-mode pass per query
        column and batch; row ``t`` of a document is the loss on token ``t + 1``."""
        from ..data.batching import collate
        from ..gradients import output_influence as oi

        if not getattr(self, "_eager", False):
            oi.use_eager_attention(self.engine.model)
            self._eager = True
        model, grad = self.engine.model, self.spec.grad
        query = torch.as_tensor(np.asarray(query), dtype=torch.float32)
        directions = oi.query_directions(model, self.engine.modules, self.engine.grad_sizes, query)
        idx = np.asarray(idx, dtype=np.int64)
        docs = self.tokenize(idx)
        n, per_token = len(idx), grad.attribute_tokens
        lengths = np.array([len(d.input_ids) for d in docs], dtype=np.int64)
        loss = np.zeros(n, dtype=np.float32)
        cols = 1 if mode in ("nearest", "max", "mean") else len(query)
        out_scores = (
            [np.zeros((0, cols), np.float32)] * n if per_token else np.zeros((n, cols), np.float32)
        )
        device = self.engine.device
        for positions in self.batches(docs):
            batch = collate([docs[j] for j in positions])
            rates, doc_loss = oi.output_token_rates(
                model, batch.input_ids.to(device), batch.labels.to(device), directions,
                loss_fn=grad.loss_fn, reduction=grad.loss_reduction,
                label_smoothing=grad.label_smoothing, advantage=batch.advantage,
            )
            rates = rates.cpu()
            if mode in ("nearest", "max"):
                rates = rates.amax(dim=-1, keepdim=True) if per_token else rates
            loss[positions] = doc_loss.cpu().numpy()
            if per_token:
                for j, pos in enumerate(positions):
                    out_scores[pos] = rates[j, : max(lengths[pos] - 1, 0)].numpy()
            else:
                s = rates.sum(dim=1)
                if mode in ("nearest", "max"):
                    s = s.amax(dim=1, keepdim=True)
                out_scores[positions] = s.numpy()
        return score_columns(idx, loss, lengths, out_scores, per_token)

    def _token_parts(self, res: BatchResult) -> list[np.ndarray]:
        """A packed batch's token rows, one ``[count, D]`` array per document, preprocessed
        document by document (the same rounding whatever else shares the batch)."""
        parts, start = [], 0
        for c in res.token_counts.tolist():
            r = res.token_rows[start : start + c]
            if self.postprocess is not None:
                r = self.postprocess(r.float()).to(res.token_rows.dtype)
            parts.append(numpy_rows(r))
            start += c
        return parts

