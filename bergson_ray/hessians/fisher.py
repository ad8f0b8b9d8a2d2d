"""The loss whose gradients define the Fisher the factors estimate.

* True Fisher (default): at every position that carries a dataset label, a label
  is *sampled* from the model's own predictive distribution and the summed
  cross-entropy of those samples is backpropagated. Positions without a dataset
  label (prompt tokens, padding) get no label, so they contribute no loss and,
  with causal attention and right padding, padding cannot leak into real
  positions' gradients (bergson-spec §11.2).
* Empirical Fisher (``use_dataset_labels``): the dataset labels themselves.

The sampled labels must not depend on batching, or factors would change with the
token budget and worker count. Each position's uniform is a hash of ``(seed,
doc_id, position)`` (``doc_id`` = the dataset row index) and the label is the
inverse-CDF sample of it: same document, same labels, whatever it is packed
with, on any worker, in any order.

``loss_reduction='mean'`` divides each document's loss by the square root of its
label count: the outer product of the gradient then carries the ``1/count``
of a mean-loss Hessian (bergson 2.5's convention).
"""

from __future__ import annotations

import torch

from ..gradients.head_loss import chunked_token_losses
from ..gradients.losses import next_token_targets, token_cross_entropy

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB
SAMPLE_CHUNK_ELEMENTS = 1 << 23
"""Positions x vocabulary per softmax/cumsum chunk (bounds the temporaries)."""


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (multiplication wraps mod 2⁶⁴)."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def position_uniforms(
    doc_ids: torch.Tensor, positions: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    """A uniform in [0, 1) per (seed, document, position), fp64; pure function of the three.

    Counter-based (a hash, not a generator stream), so a label depends only on
    which document and position it belongs to, never on batch composition,
    padding or the order in which documents are processed.
    """
    doc_ids = doc_ids.to(torch.int64)
    positions = positions.to(torch.int64)
    key = _splitmix64(torch.full_like(doc_ids, int(seed) & 0x7FFFFFFF) + _GOLDEN)
    z = _splitmix64(key ^ _splitmix64(doc_ids * _GOLDEN + positions))
    return _shr(z, 11).double() * (2.0**-53)


def sample_labels(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lengths: torch.Tensor,
    doc_ids: torch.Tensor,
    seed: int = 0,
) -> torch.Tensor:
    """Model-sampled labels in HF layout (``[N, S]``, ``-100`` where no loss).

    ``logits [N, S, V]`` are the model outputs, ``labels [N, S]`` the dataset
    labels (only their ``!= -100`` pattern is used), ``lengths [N]`` the real
    lengths and ``doc_ids [N]`` the documents' dataset row indices.
    """
    n, s, v = logits.shape
    out = torch.full((n, s), -100, dtype=torch.long, device=logits.device)
    rows, cols, u = sampled_positions(labels, lengths, doc_ids, seed, logits.device)
    if rows.numel() == 0:
        return out
    chunk = max(1, SAMPLE_CHUNK_ELEMENTS // v)
    with torch.no_grad():
        for start in range(0, rows.numel(), chunk):
            r, c = rows[start : start + chunk], cols[start : start + chunk]
            out[r, c + 1] = inverse_cdf_labels(logits[r, c], u[start : start + chunk])
    return out


def sampled_positions(
    labels: torch.Tensor,
    lengths: torch.Tensor,
    doc_ids: torch.Tensor | None,
    seed: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, cols, u)``: the positions whose logits get a sampled label (position
    ``t`` predicts token ``t + 1``, which must carry a dataset label and lie within the
    document) and each one's uniform."""
    if doc_ids is None:
        raise ValueError("the true Fisher needs doc_ids to seed each document's labels")
    lengths = torch.as_tensor(lengths, device=device)
    doc_ids = torch.as_tensor(doc_ids, device=device)
    pos = torch.arange(labels.shape[1] - 1, device=device)
    wanted = (labels[:, 1:].to(device) != -100) & (pos[None, :] + 1 < lengths[:, None])
    rows, cols = wanted.nonzero(as_tuple=True)
    return rows, cols, position_uniforms(doc_ids[rows], cols, seed)


def inverse_cdf_labels(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``[C]`` labels drawn from ``softmax(logits [C, V])`` at the uniforms ``u [C]``.

    fp32 is plenty for sampling: the CDF's rounding error (~1e-7 per step) only moves
    labels whose uniform lands within that distance of a bin edge.
    """
    with torch.no_grad():
        cdf = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1)
        target = (u.float() * cdf[:, -1])[:, None]
        return torch.searchsorted(cdf, target).squeeze(1).clamp_max(logits.shape[-1] - 1)


def fisher_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lengths: torch.Tensor,
    *,
    doc_ids: torch.Tensor | None = None,
    use_dataset_labels: bool = False,
    seed: int = 0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Scalar loss to backpropagate once per batch (sum over documents)."""
    if not use_dataset_labels:
        labels = sample_labels(logits, labels, lengths, doc_ids, seed)
    labels = labels.to(logits.device)
    tok = token_cross_entropy(logits, labels)
    return _batch_loss(tok, labels[:, 1:] != -100, reduction)


def fisher_loss_from_hidden(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    labels: torch.Tensor,
    lengths: torch.Tensor,
    *,
    doc_ids: torch.Tensor | None = None,
    use_dataset_labels: bool = False,
    seed: int = 0,
    reduction: str = "sum",
) -> torch.Tensor:
    """:func:`fisher_loss` from the base model's last hidden states ``[N, S, H]`` and
    the LM head, a chunk of logits at a time (``gradients/head_loss.py``): the same
    labels, sampled from the same uniforms, and the same loss."""
    device = hidden.device
    targets = next_token_targets(labels.to(device))
    sampler = None
    if not use_dataset_labels:
        rows, cols, u_rows = sampled_positions(labels, lengths, doc_ids, seed, device)
        targets.fill_(-100)
        targets[rows, cols] = 0  # a label goes here; the sampler draws which
        u = torch.zeros(targets.numel(), dtype=torch.float64, device=device)
        u[rows * targets.shape[1] + cols] = u_rows
        sampler = lambda logits, flat: inverse_cdf_labels(logits, u[flat])  # noqa: E731
    tok = chunked_token_losses(hidden, head, targets, sampler=sampler)[:, :-1]
    return _batch_loss(tok, targets[:, :-1] != -100, reduction)


def _batch_loss(tok: torch.Tensor, has_label: torch.Tensor, reduction: str) -> torch.Tensor:
    """The scalar to backpropagate from per-token losses ``[N, S - 1]``; ``mean`` divides
    each document by the square root of its label count."""
    per_doc = tok.sum(dim=1)
    if reduction == "mean":
        per_doc = per_doc / has_label.sum(dim=1).clamp_min(1).sqrt()
    elif reduction != "sum":
        raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {reduction!r}")
    return per_doc.sum()
