"""Weighted causal-LM losses with bergson 2.5.1's reductions.

``token_losses`` gives the cross-entropy of every next-token prediction; the reductions
multiply them by the data weights and divide by counts that do *not* depend on the
weights (bergson's ``weighted_causal_lm_ce``):

* ``mean``: ``sum(w * loss) / D`` with ``D`` the number of supervised tokens in the
  whole batch (weight-0 rows included);
* ``sum_of_means``: ``sum_i sum_t(w * loss)_i / n_i`` with ``n_i`` row ``i``'s own count.

Both are sums over rows given the full-batch counts, so a batch split into
micro-batches adds up to exactly the full-batch loss (gradient accumulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def token_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``([B, T-1] losses, [B, T-1] bool supervised)`` for logits ``[B, T, V]``.

    Half-precision logits are upcast to fp32 (fp64 stays fp64), as bergson does.
    """
    shift = logits[:, :-1, :]
    if shift.dtype != torch.float64:
        shift = shift.float()
    targets = labels[:, 1:]
    b, t, v = shift.shape
    loss = F.cross_entropy(
        shift.reshape(-1, v), targets.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
    )
    return loss.view(b, t), targets != IGNORE_INDEX


def weighted_sum(
    tok_loss: Tensor, valid: Tensor, weights: Tensor, reduction: str, batch_tokens: int
) -> Tensor:
    """This (micro-)batch's share of the batch loss.

    ``weights``: ``[B]`` per document or ``[B, T-1]`` per prediction position.
    ``batch_tokens``: supervised tokens of the whole batch (the ``mean`` denominator).
    """
    w = weights.to(tok_loss.dtype)
    w = w.view(-1, 1) if w.ndim == 1 else w
    weighted = tok_loss * w
    if reduction == "mean":
        return weighted.sum() / max(batch_tokens, 1)
    if reduction == "sum_of_means":
        counts = valid.to(tok_loss.dtype).sum(dim=1).clamp_min(1.0)
        return (weighted.sum(dim=1) / counts).sum()
    raise ValueError(f"unknown loss_reduction {reduction!r}")


def doc_mean_losses(tok_loss: Tensor, valid: Tensor) -> Tensor:
    """Each row's mean loss over its supervised tokens (0 for a row with none)."""
    counts = valid.to(tok_loss.dtype).sum(dim=1)
    return tok_loss.sum(dim=1) / counts.clamp_min(1.0)
