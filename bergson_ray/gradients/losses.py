"""Per-document losses whose sum is backpropagated once per batch.

Summing the per-document losses (instead of averaging over the batch) makes each
document's gradient independent of which other documents share its batch, which
is what lets results be invariant to batch size, worker count and scheduling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_document_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: str = "sum",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Next-token cross-entropy per document, ``[N]``.

    ``labels`` follow the HF convention (aligned with ``input_ids``; ``-100`` = no
    loss); position ``s`` is scored against ``labels[s + 1]``. ``reduction='mean'``
    divides each document by its own count of loss tokens.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(shift_labels.shape)
    per_doc = tok.sum(dim=1)
    if reduction == "mean":
        per_doc = per_doc / (shift_labels != -100).sum(dim=1).clamp_min(1)
    elif reduction != "sum":
        raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {reduction!r}")
    return per_doc


def collection_mask(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[N, S]`` bool: position ``s`` of a length-``L`` doc is collected iff ``s + 1 < L``.

    Every real position except the last one (whose output predicts nothing);
    padding is excluded. Per-token rows therefore sum to the sequence gradient.
    """
    pos = torch.arange(seq_len, device=lengths.device)
    return pos[None, :] + 1 < lengths[:, None]
