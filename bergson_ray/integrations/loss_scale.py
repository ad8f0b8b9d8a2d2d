"""Recover how much the trainer's loss scaled each document's gradient.

A trainer backpropagates ``c * sum(token losses)``, with ``c`` set by how it reduces the
loss: ``1 / (labelled tokens in the batch)`` for HF's mean, ``1 / num_items_in_batch``
under gradient accumulation, times the process count when tokens are averaged across
devices, and so on. A per-example row taken from that backward pass is ``c`` times the
gradient of the document's own summed loss, which is what ``build`` stores. Rather than
re-deriving ``c`` from the trainer's version-dependent bookkeeping, we read it off the
gradient that reached the logits: for cross-entropy at a position whose label is ``y``,

    dL/dz_v = c * (softmax(z)_v - [v == y])

so for any ``v != y``, ``c = (dL/dz_v) / softmax(z)_v``. We take, per document, its first
labelled position and the non-label ``v`` of largest probability (the best-conditioned
ratio): ``N`` softmaxes over the vocabulary per batch, nothing per token.

Pure torch: no trainer, no hooks.
"""

from __future__ import annotations

import torch


def first_loss_position(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos [N], has [N])``: each row's first position ``s`` whose next label is not ``-100``
    (HF convention: logits at ``s`` predict ``labels[s + 1]``)."""
    target = labels[:, 1:] != -100
    has = target.any(dim=1)
    pos = target.int().argmax(dim=1)
    return pos, has


def per_document_scale(
    logits: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``c [N]`` (float32): the factor the backward pass applied to each document's loss.

    ``logits``/``grad``: ``[N, S, V]`` (the logits the loss was computed from, and the
    gradient that reached them); ``labels``: ``[N, S]``. Documents without a labelled
    position get ``1`` (their gradient is zero anyway).
    """
    n = logits.shape[0]
    pos, has = first_loss_position(labels.to(logits.device))
    rows = torch.arange(n, device=logits.device)
    z = logits[rows, pos].float()  # [N, V]
    g = grad[rows, pos].float()
    y = labels.to(logits.device)[rows, pos + 1].clamp_min(0)
    p = torch.softmax(z, dim=-1)
    others = p.clone()
    others[rows, y] = -1.0
    v = others.argmax(dim=-1)
    scale = g[rows, v] / p[rows, v]
    ok = has & torch.isfinite(scale) & (scale != 0)
    return torch.where(ok, scale, torch.ones_like(scale))


def loss_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """``[N]`` labelled (loss-carrying) positions per document, at least 1."""
    return (labels[:, 1:] != -100).sum(dim=1).clamp_min(1)
