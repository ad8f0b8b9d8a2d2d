"""One-call metagradients for small runs (tests, notebooks): forward, query gradient(s),
one reverse pass per query; the Ray pipeline does the same with the passes spread out."""

from __future__ import annotations

import torch
from torch import Tensor

from ..training.data import TokenizedData
from .query import query_gradient
from .replay import forward, initial_weights, reverse
from .states import StateStore
from .vjp import Recipe


def metagradient(
    recipe: Recipe,
    query: TokenizedData,
    aggregation: str = "mean",
    *,
    per_token: bool = False,
    store: StateStore | None = None,
) -> Tensor:
    """Scores ``+dL_q/dw``: ``[N]`` (or ``[N, L]`` per token) for ``mean``/``sum``;
    ``[N, Q]`` (or ``[N, L, Q]``) with one column per query document for ``none``."""
    store = store if store is not None else StateStore()
    weights = initial_weights(recipe, per_token)
    final = forward(recipe, weights, store)
    queries = list(range(len(query))) if aggregation == "none" else [None]
    cols = []
    for q in queries:
        cot, _ = query_gradient(recipe.model, final.params, query, aggregation, q)
        cols.append(reverse(recipe, store, cot, weights))
    return torch.stack(cols, dim=-1) if aggregation == "none" else cols[0]
