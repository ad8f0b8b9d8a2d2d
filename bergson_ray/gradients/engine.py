"""GradientEngine: a model plus settings in, per-example gradient rows out.

This is the single entry point the Ray workers, the query actor and the
in-process Attributor use, so every path computes rows the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import GradientConfig
from ..errors import BadInputError
from .collector import PerExampleCollector
from .head_loss import chunked_token_losses, head_split, last_hidden
from .hooks import InputGradSwitch, ModuleTaps
from .losses import collection_mask, document_losses, next_token_targets, per_document_loss
from .modules import find_target_modules
from .normalizers import Normalizer


@dataclass
class BatchResult:
    rows: torch.Tensor | None
    """``[N, D]`` per-document rows (store dtype, CPU); None in per-token mode."""
    loss: torch.Tensor
    """``[N]`` per-document loss (fp32)."""
    token_rows: torch.Tensor | None = None
    """``[T, D]`` per-token rows (per-token mode), documents in batch order."""
    token_counts: torch.Tensor | None = None
    """``[N]`` token rows per document (``max(length - 1, 0)``)."""
    num_positions: int = 0
    """Collected (gradient-carrying) positions in the batch."""


def finite_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast, clamping to the target's finite range first (fp16 overflows otherwise)."""
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(x.dtype).max:
        lim = torch.finfo(dtype).max
        x = x.clamp(-lim, lim)
    return x.to(dtype)


class GradientEngine:
    """Computes per-example gradients for the target modules of ``model``.

    The model is put in eval mode with every parameter frozen; gradients come
    only from the module taps, so no ``.grad`` is ever accumulated.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: GradientConfig,
        *,
        normalizers: dict[str, Normalizer] | None = None,
        store_dtype: torch.dtype | None = None,
    ):
        if cfg.loss_fn not in ("ce", "log_odds"):
            raise BadInputError(f"loss_fn={cfg.loss_fn!r} is not supported (use 'ce' or 'log_odds')")
        self.model = model.eval().requires_grad_(False)
        self.cfg = cfg
        self.modules = find_target_modules(model, cfg)
        self.collector = PerExampleCollector(self.modules, cfg, normalizers)
        self.grad_sizes = self.collector.grad_sizes
        self.dim = self.collector.dim
        self.store_dtype = store_dtype or next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    def compute(self, batch) -> BatchResult:
        """Run one packed batch (``data.batching.PackedBatch``) forward and backward."""
        input_ids = batch.input_ids.to(self.device)
        labels = batch.labels.to(self.device)
        lengths = torch.as_tensor(batch.lengths, device=self.device)
        advantage = getattr(batch, "advantage", None)
        mask = collection_mask(lengths, input_ids.shape[1])
        self.collector.begin(mask, flat=True)
        with torch.enable_grad(), InputGradSwitch(self.model), ModuleTaps(
            self.modules, self.collector
        ):
            loss = self._loss(input_ids, labels)
            weighted = loss
            if advantage is not None:
                weighted = loss * torch.as_tensor(advantage, device=loss.device, dtype=loss.dtype)
            weighted.sum().backward()
        flat = finite_cast(self.collector.finish_flat(), self.store_dtype).cpu()
        n_pos = int(mask.sum())
        loss = loss.detach().float().cpu()
        if self.cfg.attribute_tokens:
            counts = mask.sum(dim=1).cpu()
            return BatchResult(None, loss, flat, counts, n_pos)
        return BatchResult(flat, loss, num_positions=n_pos)

    def _loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-document losses ``[N]``; without materializing the logits where the model
        allows it (``head_loss.py``)."""
        cfg = self.cfg
        split = head_split(self.model)  # per call: a hook added later changes the answer
        if split is None:
            return per_document_loss(
                self.model(input_ids).logits,
                labels,
                reduction=cfg.loss_reduction,
                label_smoothing=cfg.label_smoothing,
                loss_fn=cfg.loss_fn,
            )
        body, head = split
        tok = chunked_token_losses(
            last_hidden(body, input_ids),
            head,
            next_token_targets(labels),
            loss_fn=cfg.loss_fn,
            label_smoothing=cfg.label_smoothing if cfg.loss_fn == "ce" else 0.0,
        )
        return document_losses(tok[:, :-1], labels, cfg.loss_reduction)
