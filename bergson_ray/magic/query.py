"""The query gradient at the trained parameters: the cotangent the reverse pass starts from.

bergson's aggregations (``--aggregation``):

* ``none``: one cotangent per query document, the gradient of *its* token-mean loss
  (one reverse pass, i.e. one score column, per document);
* ``mean``: the pooled token mean over all query tokens (not a mean of document means);
* ``sum``: the sum of all query token losses.

Query data are never weighted. The model runs in eval mode (no dropout), as for the
losses ``validate`` measures.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import BadInputError
from ..training.data import TokenizedData, collate
from ..training.losses import token_losses

AGGREGATIONS = ("none", "mean", "sum")


def token_counts(data: TokenizedData) -> list[int]:
    """Loss-bearing tokens per query document (labels shifted by one)."""
    return [int((lab[1:] != -100).sum()) for lab in data.labels]


def check_query(data: TokenizedData) -> list[int]:
    """Reject a query set whose documents carry no loss (e.g. all cut by truncation)."""
    counts = token_counts(data)
    if sum(counts) == 0:
        raise BadInputError(
            "the query set has no loss-bearing tokens (every document is shorter than 2 "
            "tokens or fully masked after truncation); MAGIC needs a query loss"
        )
    return counts


def _summed_loss(model: nn.Module, params: dict[str, Tensor], data: TokenizedData, rows) -> Tensor:
    ids, labels = collate(data, rows)
    logits = functional_call(model, params, (ids,), {"use_cache": False}).logits
    tok, _ = token_losses(logits, labels)
    return tok.sum()


def query_gradient(
    model: nn.Module,
    params: dict[str, Tensor],
    data: TokenizedData,
    aggregation: str,
    query: int | None = None,
    batch_size: int = 16,
) -> tuple[dict[str, Tensor], float]:
    """``(d L_q / d theta, L_q)`` for one document (``aggregation none``, ``query`` = its
    index) or for the whole set (``mean`` / ``sum``)."""
    if aggregation not in AGGREGATIONS:
        raise BadInputError(f"--aggregation must be one of {', '.join(AGGREGATIONS)}")
    counts = check_query(data)
    if aggregation == "none":
        if query is None:
            raise BadInputError("aggregation none needs a query document index")
        groups, denom = [(query,)], max(counts[query], 1)
    else:
        rows = list(range(len(data)))
        groups = [tuple(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
        denom = sum(counts) if aggregation == "mean" else 1
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    names = list(leaves)
    total = {k: torch.zeros_like(v) for k, v in leaves.items()}
    value = 0.0
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for rows in groups:
                loss = _summed_loss(model, leaves, data, rows) / denom
                got = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
                for k, g in zip(names, got):
                    if g is not None:
                        total[k] += g
                value += float(loss.detach())
    finally:
        model.train(was)
    return total, value
