"""MAGIC (Ilyas & Engstrom 2025): exact metagradients of a query loss w.r.t. the data
weights of a training run, by replaying training backwards (pure torch, no Ray).

Public API::

    Recipe(model, data, cfg, double_backward_batch_size=None)
    StateStore(root=None)                 # saved training states (memory or directory)
    initial_weights(recipe, per_token)    # all-ones [N] or [N, max_length]
    forward(recipe, weights, store) -> State               # train once, save states
    query_gradient(model, params, query_data, aggregation, query=None) -> (grads, loss)
    reverse(recipe, store, cotangent, weights, ...) -> Tensor   # d L_q / d w
    metagradient(...)                     # the three above in one call (tests, notebooks)

Sign: the result is ``+d L_query / d w`` (bergson's loss-signed convention: negative =
up-weighting the document lowers the query loss, a proponent).
"""

from __future__ import annotations

from .api import metagradient
from .query import check_query, query_gradient, token_counts
from .replay import forward, initial_weights, reverse
from .states import State, StateStore
from .vjp import Recipe

__all__ = [
    "Recipe",
    "State",
    "StateStore",
    "check_query",
    "forward",
    "initial_weights",
    "metagradient",
    "query_gradient",
    "reverse",
    "token_counts",
]
