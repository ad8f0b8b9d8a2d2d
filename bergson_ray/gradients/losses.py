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
    loss_fn: str = "ce",
) -> torch.Tensor:
    """Next-token loss per document, ``[N]``: cross-entropy, or with ``loss_fn='log_odds'``
    the negative label log-odds (:func:`token_log_odds_loss`, TRAK's output function).

    ``labels`` follow the HF convention (aligned with ``input_ids``; ``-100`` = no
    loss); position ``s`` is scored against ``labels[s + 1]``. ``reduction='mean'``
    divides each document by its own count of loss tokens. Label smoothing applies to
    cross-entropy only.
    """
    if loss_fn == "log_odds":
        targets = next_token_targets(labels)
        tok = token_log_odds_loss(logits, targets)[:, :-1]
    elif loss_fn == "ce":
        tok = token_cross_entropy(logits, labels, label_smoothing)
    else:
        raise ValueError(f"loss_fn must be 'ce' or 'log_odds', got {loss_fn!r}")
    return document_losses(tok, labels, reduction)


def document_losses(tok: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """``[N]``: the next-token losses ``tok [N, S - 1]`` summed per document, or with
    ``reduction='mean'`` divided by the document's count of loss tokens."""
    shift_labels = labels[:, 1:]
    per_doc = tok.sum(dim=1)
    if reduction == "mean":
        per_doc = per_doc / (shift_labels != -100).sum(dim=1).clamp_min(1)
    elif reduction != "sum":
        raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {reduction!r}")
    return per_doc


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """``[N, S]``: the label position ``s`` is scored against (``labels[:, s + 1]``), and
    ``-100`` at the last position, which predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Next-token cross-entropy per position, ``[N, S - 1]`` (0 where the label is -100).

    Every position of ``logits [N, S, V]`` is scored in place against the labels shifted
    left, the last one ignored. Why not ``logits[:, :-1]``: flattening that slice copies
    the whole logit tensor, and its backward zero-fills and copies it again, about 7 % of
    a small model's step on a CPU. The ignored position has zero loss and zero gradient,
    so the values, and the gradients, are the same bits.
    """
    targets = next_token_targets(labels)
    tok = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(targets.shape)
    return tok[:, :-1]


def collection_mask(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[N, S]`` bool: position ``s`` of a length-``L`` doc is collected iff ``s + 1 < L``.

    Every real position except the last one (whose output predicts nothing);
    padding is excluded. Per-token rows therefore sum to the sequence gradient.
    """
    pos = torch.arange(seq_len, device=lengths.device)
    return pos[None, :] + 1 < lengths[:, None]


def token_log_odds_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-odds of the label, ``[N, S]`` (0 where ``labels == -100``).

    ``-(z_y - logsumexp_{v != y} z_v)`` = ``-log(p_y / (1 - p_y))``: the model output
    function TRAK (Park et al. 2023) linearizes, as bergson's ``loss_fn=log_odds``.
    ``logits [N, S, V]`` and ``labels [N, S]`` are already aligned (shifted).
    """
    logits = logits.float()
    valid = labels != -100
    idx = labels.clamp(min=0).unsqueeze(-1)
    z_y = logits.gather(-1, idx).squeeze(-1)
    others = logits.scatter(-1, idx, float("-inf")).logsumexp(-1)
    return -(z_y - others) * valid


def mean_label_probability(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p [N], count [N])``: each document's mean next-token probability of its labels
    and its number of loss tokens (HF-convention ``labels``, as :func:`per_document_loss`).

    ``1 - p`` is TRAK's per-example ``Q`` weight: the derivative of the loss with respect
    to the log-odds output, averaged over the document's tokens. A document without loss
    tokens gets ``p = 0``.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    logp = torch.log_softmax(shift_logits, dim=-1)
    tok = logp.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return mean_of_label_probabilities(tok, labels)


def mean_of_label_probabilities(
    label_log_probs: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mean_label_probability` from the log-probabilities of each position's next
    label, ``[N, S - 1]`` (any value where ``labels[:, 1:] == -100``)."""
    valid = labels[:, 1:] != -100
    count = valid.sum(dim=1)
    p = (label_log_probs.exp() * valid).sum(dim=1) / count.clamp_min(1)
    return p, count


def scale_logits(model: torch.nn.Module, scale: float):
    """``--logit_scale``: make ``model`` output ``scale * logits`` (bergson's experimental
    option), so every loss and sampled label downstream sees the scaled logits.

    A forward hook on the output embeddings (the LM head) scales their output; it is not
    a tracked module, so gradients of the tracked modules are those of
    ``loss(scale * logits)``. Returns the hook handle (None when ``scale == 1``).
    """
    if scale == 1.0:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        from ..errors import BadInputError

        raise BadInputError(
            f"--logit_scale {scale} needs a causal LM with output embeddings; "
            f"{type(model).__name__} has none"
        )
    return head.register_forward_hook(lambda _module, _inputs, output: output * scale)
