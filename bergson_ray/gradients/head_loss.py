"""Next-token losses from the last hidden states, the LM head applied a chunk at a time.

A packed batch of ``T`` tokens has ``T x V`` logits: 2048 x 50,304 fp32 is 0.4 GB, and
autograd keeps the log-softmax for the backward pass and makes two more tensors of that
size there (the loss's gradient and the logits'). For a 128k vocabulary the loss of one
batch needs about 4 GB, more than the model's activations. Nothing downstream needs the
logits: the gradients we collect are those of the modules inside the base model, and the
head itself is never tracked (``modules.py``).

:func:`chunked_token_losses` therefore applies the head to ``CHUNK_BYTES`` worth of
positions at a time. For each chunk it computes the per-token losses and, right away,
the gradient of each position's loss with respect to its hidden state
(``(softmax - target) @ W``, ``[T, H]``, tiny next to the logits). The backward pass
only scales those rows by the upstream gradient of each token's loss, so any weighting
(sum, mean, advantages) stays exact. The head's matrix products are the same two as
autograd's (logits forward, input gradient backward; the frozen head gets no weight
gradient), so the chunked loss costs no extra compute; and only positions with a label
reach the head, so padding and each document's last position cost nothing there.

:func:`head_split` says when this is valid: the model's logits must be exactly
``head(base_model(ids)[0])``, which holds for the standard HF causal LMs listed in
``SPLIT_MODEL_TYPES`` and not, say, for Gemma-2's soft-capped logits or a head with
hooks (``--logit_scale``). Every other model keeps the full-logit loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 64 << 20
"""fp32 logits per chunk: 64 MiB is 333 positions of a 50k vocabulary."""

SPLIT_MODEL_TYPES = frozenset(
    {
        "gpt2",
        "gpt_neox",
        "llama",
        "mistral",
        "mixtral",
        "olmo",
        "olmo2",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
    }
)
"""HF causal LMs whose forward computes ``logits = lm_head(base_model(...)[0])``."""

Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(fp32 logits [C, V] of positions that carry a label, their flat indices [C]) ->
labels [C]``: replaces those labels by ones drawn from the model (the true Fisher)."""


def head_split(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """``(base model, LM head)`` when ``model``'s logits are the head applied to the base
    model's last hidden states and nothing else; None otherwise (use the full logits).
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SPLIT_MODEL_TYPES:
        return None
    if not type(model).__module__.startswith("transformers."):
        return None  # a wrapper (PEFT, a user's subclass) may change the forward
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if type(head) is not nn.Linear or body is None or body is model:
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in (model, head)):
        return None  # --logit_scale's hook changes the logits; FSDP's root hooks gather
    return body, head


def last_hidden(body: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The base model's last hidden states ``[N, S, H]`` (what the head would read)."""
    return body(input_ids=input_ids, use_cache=False)[0]


def chunked_token_losses(
    hidden: torch.Tensor,
    head: nn.Linear,
    targets: torch.Tensor,
    *,
    loss_fn: str = "ce",
    label_smoothing: float = 0.0,
    sampler: Sampler | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Per-position losses ``[...]`` of ``head(hidden)`` against ``targets`` (same shape
    as ``hidden[..., 0]``; ``-100`` = no loss, zero loss and gradient).

    ``loss_fn='ce'`` is cross-entropy (with ``label_smoothing`` as in
    ``F.cross_entropy``); ``'log_odds'`` is the negative label log-odds of
    ``losses.token_log_odds_loss``. A ``sampler`` draws the label of every position
    that has one from that position's logits (``hessians/fisher.py``). ``chunk``
    positions per head product (default: as many as fit ``CHUNK_BYTES`` of fp32 logits).
    """
    if loss_fn not in ("ce", "log_odds"):
        raise ValueError(f"loss_fn must be 'ce' or 'log_odds', got {loss_fn!r}")
    shape = hidden.shape[:-1]
    flat = _ChunkedHeadLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,
        head.bias,
        targets.reshape(-1),
        loss_fn,
        float(label_smoothing),
        sampler,
        chunk or chunk_rows(head),
    )
    return flat.view(shape)


def chunked_label_log_probs(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """``log p(target)`` of every position of ``head(hidden)`` (``[...]``, 0 where
    ``targets == -100``), a chunk of logits at a time and without autograd: the forward
    pass TRAK's ``1 - p`` weights need (``actors/label_probs.py``)."""
    chunk = chunk or chunk_rows(head)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    out = torch.zeros(flat_targets.shape, dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for rows in label_positions(flat_targets, chunk):
            logits = F.linear(flat_hidden[rows], head.weight, head.bias)
            log_p = torch.log_softmax(logits.float(), dim=-1)
            out[rows] = log_p.gather(1, flat_targets[rows, None]).squeeze(1)
    return out.view(targets.shape)


def chunk_rows(head: nn.Linear) -> int:
    """Positions per head product: as many as fit ``CHUNK_BYTES`` of fp32 logits."""
    return max(1, CHUNK_BYTES // (4 * head.out_features))


def label_positions(targets: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """The flat positions of ``targets [T]`` that carry a label (``!= -100``), in runs
    of at most ``chunk``."""
    rows = (targets != -100).nonzero().squeeze(1)
    return list(rows.split(chunk))


class _ChunkedHeadLoss(torch.autograd.Function):
    """Losses ``[T]`` of ``hidden [T, H]``; saves ``d loss_t / d hidden_t`` instead of logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, loss_fn, smoothing, sampler, chunk):
        losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        d_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        # Only positions with a target reach the head: padding and each document's last
        # position have zero loss and zero gradient, and skipping them skips their logits.
        for rows in label_positions(targets, chunk):
            logits = F.linear(hidden[rows], weight, bias).float()
            y = targets[rows] if sampler is None else sampler(logits, rows)
            loss, grad = _loss_and_logit_grad(logits, y, loss_fn, smoothing)
            losses[rows] = loss
            if d_hidden is not None:
                d_hidden[rows] = grad.to(weight.dtype) @ weight
        ctx.save_for_backward(d_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (d_hidden,) = ctx.saved_tensors
        grad = None
        if d_hidden is not None:
            grad = (grad_losses[:, None] * d_hidden.float()).to(d_hidden.dtype)
        return grad, None, None, None, None, None, None, None


def _loss_and_logit_grad(
    logits: torch.Tensor, y: torch.Tensor, loss_fn: str, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's loss ``[C]`` and its gradient with respect to that row's logits
    ``[C, V]``; ``logits`` may be overwritten."""
    rows = torch.arange(len(y), device=logits.device)
    if loss_fn == "log_odds":
        z_y = logits[rows, y]
        # -(z_y - logsumexp over the other classes); d/dz_y = -1, d/dz_v = their softmax
        logits[rows, y] = float("-inf")
        lse = torch.logsumexp(logits, dim=-1)
        grad = logits.sub_(lse[:, None]).exp_()
        grad[rows, y] = -1.0
        return lse - z_y, grad
    # The ops of F.cross_entropy and its backward (log-softmax, then exp of it minus the
    # target), so that losses and logit gradients come out in the same bits.
    vocab = logits.shape[-1]
    log_p = torch.log_softmax(logits, dim=-1)
    del logits
    loss = -log_p[rows, y]
    if smoothing:
        # (1 - e) * nll + e / V * sum over classes of -log p
        loss = (1 - smoothing) * loss + (smoothing / vocab) * -log_p.sum(dim=-1)
    grad = log_p.exp_()
    grad[rows, y] -= 1.0 - smoothing
    if smoothing:
        grad.sub_(smoothing / vocab)
    return loss, grad
