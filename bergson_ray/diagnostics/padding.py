"""Does a document's gradient depend on what it is batched with? (pure torch)

Per-example gradients are only attributions if a document's gradient is the same
alone and inside a padded batch. In exact arithmetic it is (causal attention, right
padding, a per-document loss); in practice kernels chosen by shape, reduced precision
and attention implementations can make it drift. We measure the cosine between the
gradient of a document's summed token loss computed

* alone (a batch of one), and
* as row 0 of a batch with a second document: a *longer* one (so row 0 is padded:
  :func:`padding_trials`) or random tokens of the *same* length (no padding, only a
  second row: :func:`equal_length_trials`, which separates padding effects from
  batching effects).

The batch is built like the gradient engine's (right padding with id 0, labels -100 on
padding, no attention mask), over every parameter that requires a gradient; dot products
are accumulated in float64.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..gradients.losses import per_document_loss


@dataclass(frozen=True)
class Trial:
    """One alone-vs-batched comparison."""

    trial: int
    short_len: int
    long_len: int
    cos_sim: float
    loss_diff: float

    @property
    def ratio(self) -> float:
        return self.long_len / max(self.short_len, 1)


def padded_batch(docs: Sequence[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` ``[N, S]``: right padded with ``pad_id``, labels -100 there."""
    width = max(len(d) for d in docs)
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(docs), width), -100, dtype=torch.long)
    for row, d in enumerate(docs):
        ids[row, : len(d)] = d
        labels[row, : len(d)] = d
    return ids, labels


def _first_document_grads(
    model: nn.Module, docs: Sequence[torch.Tensor], pad_id: int
) -> tuple[dict[str, torch.Tensor], float]:
    """Gradients of row 0's summed token loss w.r.t. every trainable parameter, and that loss."""
    device = next(model.parameters()).device
    ids, labels = padded_batch(docs, pad_id)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        logits = model(ids.to(device)).logits
        loss = per_document_loss(logits, labels.to(device))[0]
        loss.backward()
    grads = {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }
    model.zero_grad(set_to_none=True)
    return grads, float(loss.detach().float())


def gradient_cosine(
    model: nn.Module, doc: torch.Tensor, other: torch.Tensor, pad_id: int = 0
) -> tuple[float, float]:
    """``(cosine, |loss difference|)`` of ``doc``'s gradient alone vs batched before ``other``."""
    alone, loss_alone = _first_document_grads(model, [doc], pad_id)
    mixed, loss_mixed = _first_document_grads(model, [doc, other], pad_id)
    dot = norm_a = norm_b = 0.0
    for name, ga in alone.items():
        gb = mixed.get(name)
        if gb is None:
            continue
        a, b = ga.double(), gb.double()
        dot += float((a * b).sum())
        norm_a += float((a * a).sum())
        norm_b += float((b * b).sum())
    cos = dot / (norm_a**0.5 * norm_b**0.5 + 1e-30)
    return cos, abs(loss_mixed - loss_alone)


def padding_trials(
    model: nn.Module, docs: Sequence[torch.Tensor], n_trials: int, seed: int, pad_id: int = 0
) -> list[Trial]:
    """``n_trials`` random pairs of documents; the shorter one is measured, padded to the other."""
    if len(docs) < 2:
        raise ValueError("padding trials need at least two documents")
    rng = random.Random(seed)
    out = []
    for t in range(n_trials):
        i, j = rng.sample(range(len(docs)), 2)
        short, long = sorted((docs[i], docs[j]), key=len)
        cos, diff = gradient_cosine(model, short, long, pad_id)
        out.append(Trial(t, len(short), len(long), cos, diff))
    return out


def equal_length_trials(
    model: nn.Module, docs: Sequence[torch.Tensor], n_trials: int, seed: int, vocab_size: int
) -> list[Trial]:
    """``n_trials`` documents, each batched with random tokens of its own length (no padding)."""
    if not docs:
        raise ValueError("equal-length trials need at least one document")
    rng = random.Random(seed)
    out = []
    for t in range(n_trials):
        doc = docs[rng.randrange(len(docs))]
        noise = torch.tensor([rng.randrange(vocab_size) for _ in range(len(doc))], dtype=torch.long)
        cos, diff = gradient_cosine(model, doc, noise)
        out.append(Trial(t, len(doc), len(doc), cos, diff))
    return out


def count_flagged(trials: Sequence[Trial], threshold: float) -> int:
    """Trials whose cosine is below ``threshold``."""
    return sum(1 for t in trials if t.cos_sim < threshold)
