"""Query texts in, query gradient rows out, made exactly as the store's rows were made.

The store's ``config.yaml`` gives the model, target modules, projection, loss and
optimizer normalizers; :class:`~bergson_ray.runners.gradient_runner.GradientRunner` rebuilds the
very engine the build workers ran. Build-time preprocessing (preconditioning, unit norm)
is *not* applied here: :func:`~bergson_ray.query.transform.make_transforms` decides what
the query side needs, so the same rule serves exact and FAISS search.

Queries are plain texts (loss on every token, like ``bergson query``) or
``(prompt, completion)`` pairs (chat template, loss on the completion only).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import BatchConfig, DataConfig, GradientConfig, ModelConfig, PreprocessConfig
from ..errors import BadInputError, StoreError
from .store_spec import StoreSpec

log = logging.getLogger(__name__)

Query = str | tuple[str, str] | dict[str, str]


def normalize_queries(queries: Any) -> list[Query]:
    """Accept one text, a list of texts, pairs or ``{"prompt", "completion"}`` dicts."""
    if isinstance(queries, (str, dict)):
        queries = [queries]
    if (
        isinstance(queries, tuple)
        and len(queries) == 2
        and all(isinstance(q, str) for q in queries)
    ):
        queries = [queries]
    if not isinstance(queries, Sequence) or len(queries) == 0:
        raise BadInputError("give at least one query text")
    out: list[Query] = []
    for i, q in enumerate(queries):
        if isinstance(q, dict):
            if set(q) != {"prompt", "completion"}:
                raise BadInputError(f"query {i}: a dict needs exactly 'prompt' and 'completion'")
            q = (q["prompt"], q["completion"])
        if isinstance(q, (list, tuple)):
            if len(q) != 2 or not all(isinstance(x, str) for x in q):
                raise BadInputError(f"query {i}: a pair must be (prompt: str, completion: str)")
            if not q[1].strip():
                raise BadInputError(f"query {i}: the completion is empty")
            out.append((q[0], q[1]))
        elif isinstance(q, str):
            if not q.strip():
                raise BadInputError(f"query {i} is empty text")
            out.append(q)
        else:
            raise BadInputError(
                f"query {i}: expected text or a (prompt, completion) pair, got {type(q).__name__}"
            )
    return out


class QueryGradientMaker:
    """Holds the model; ``compute(queries) -> [Q, dim]`` float32 raw gradient rows."""

    def __init__(
        self,
        spec: StoreSpec,
        *,
        model: str = "",
        device: str = "cpu",
        token_batch_size: int | None = None,
    ):
        from ..runners.gradient_runner import GradientRunner, RunnerSpec

        if spec.build is None:
            raise StoreError(
                f"{spec.path} has no readable build config.yaml, so the query gradients cannot "
                "be made the way its rows were (search with query gradients instead)"
            )
        build = spec.build
        model_cfg: ModelConfig = build.model
        if model:
            model_cfg = dataclasses.replace(model_cfg, model=model)
        # Per-token stores still get one row per query: the sum of its token rows.
        grad: GradientConfig = dataclasses.replace(build.grad, attribute_tokens=False)
        batch = BatchConfig(
            token_batch_size=token_batch_size or build.batch.token_batch_size,
            max_batch_size=build.batch.max_batch_size,
        )
        self.data_cfg: DataConfig = build.data
        self.runner = GradientRunner(
            RunnerSpec(
                model=model_cfg,
                grad=grad,
                data=build.data,
                batch=batch,
                preprocess=PreprocessConfig(),
                skip_short_docs=False,
                device=device,
            )
        )
        self.grad_sizes = dict(self.runner.engine.grad_sizes)
        if self.grad_sizes != spec.grad_sizes:
            raise StoreError(
                f"the model {model_cfg.model!r} gives gradient rows laid out as "
                f"{_brief(self.grad_sizes)} but store {spec.path} has {_brief(spec.grad_sizes)}"
            )
        self.dim = sum(self.grad_sizes.values())

    def _tokenize(self, queries: list[Query]) -> list:
        try:
            return self._tokenize_unchecked(queries)
        except BadInputError as err:  # the tokenizer speaks of dataset rows
            raise BadInputError(str(err).replace("row ", "query ", 1)) from None

    def _tokenize_unchecked(self, queries: list[Query]) -> list:
        from ..data.tokenize import tokenize_rows

        plain = DataConfig(prompt_column="text", truncation=self.data_cfg.truncation)
        pair = DataConfig(
            prompt_column="prompt",
            completion_column="completion",
            truncation=self.data_cfg.truncation,
        )
        docs: list = [None] * len(queries)
        texts = [(i, q) for i, q in enumerate(queries) if isinstance(q, str)]
        pairs = [(i, q) for i, q in enumerate(queries) if not isinstance(q, str)]
        tok, limit = self.runner.tokenizer, self.runner.max_length
        if texts:
            out = tokenize_rows(
                {"text": [q for _, q in texts]}, tok, plain, limit, row_ids=[i for i, _ in texts]
            )
            for (i, _), d in zip(texts, out):
                docs[i] = d
        if pairs:
            out = tokenize_rows(
                {"prompt": [q[0] for _, q in pairs], "completion": [q[1] for _, q in pairs]},
                tok,
                pair,
                limit,
                row_ids=[i for i, _ in pairs],
            )
            for (i, _), d in zip(pairs, out):
                docs[i] = d
        for i, d in enumerate(docs):
            if len(d.input_ids) < 2 or not (np.asarray(d.labels) != -100).any():
                raise BadInputError(
                    f"query {i} is too short: it needs at least 2 tokens (with loss) "
                    "to have a gradient"
                )
        return docs

    def compute(self, queries: Any) -> np.ndarray:
        """Raw (un-preconditioned, un-normalized) query gradient rows ``[Q, dim]``."""
        queries = normalize_queries(queries)
        docs = self._tokenize(queries)
        rows = np.zeros((len(docs), self.dim), dtype=np.float32)
        for positions, res in self.runner.run_docs(docs):
            rows[positions] = res.rows.float().numpy()
        return rows


def _brief(sizes: dict[str, int]) -> str:
    items = list(sizes.items())
    head = ", ".join(f"{k}: {v}" for k, v in items[:3])
    return f"{{{head}{', ...' if len(items) > 3 else ''}}} ({len(items)} modules, dim {sum(sizes.values())})"
