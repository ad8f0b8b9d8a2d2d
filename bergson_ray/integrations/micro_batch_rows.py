"""Rows of the trainer's own micro-batches: the hooks half of ``GradientCollectorCallback``.

The callback (``hf_callback.py``) decides *when* (trainer events) and *where* (shards,
stores, ``order.hf``); this collaborator turns each forward/backward pass the trainer
runs into per-document rows:

* a forward pre-hook on the model takes the batch's dataset indices (``_idx``, threaded
  by ``collator.py``), labels and attention mask, and opens a :class:`MicroBatch`;
* the module taps (``gradients/hooks.py``) hand each target module's ``a`` and ``g`` to
  the collector at once (live mode), or stash them until the optimizer step has run
  (deferred mode: ``use_optimizer_state``, whose normalizers are that step's moments);
* a hook on the logits' gradient reads the factor the trainer put on each document's loss
  (``loss_scale.py``), which :meth:`MicroBatchRows.take_step` divides out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config.sections import GradientConfig
from ..errors import BadInputError
from ..gradients.collector import PerExampleCollector
from ..gradients.hooks import ModuleTaps
from ..gradients.normalizers import Normalizer
from .collator import IDX
from .loss_scale import loss_token_counts, per_document_scale

_SEEN_IDX = "_bergson_ray_idx"
"""Model attribute holding the batch's ``_idx`` between the forward pre- and post-hooks."""


@dataclass
class MicroBatch:
    """What one forward/backward pass of the trainer left for us."""

    idx: torch.Tensor  # [N] dataset indices (on the batch's device until the step's flush)
    labels: torch.Tensor  # [N, S]
    mask: torch.Tensor  # [N, S] bool: positions whose gradients are collected
    scale: torch.Tensor | None = None  # [N] the trainer's factor on each document's loss
    acts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    rows: torch.Tensor | None = None  # [N, D] float32 once computed, before loss scaling


def _logits_of(output: Any) -> torch.Tensor | None:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    return logits if isinstance(logits, torch.Tensor) else None


class MicroBatchRows:
    """Per-document rows of the micro-batches a model trains on, between two optimizer steps.

    ``deferred``: keep each micro-batch's ``a``/``g`` until :meth:`take_step` is given the
    step's normalizers; otherwise rows are formed during the backward pass itself.
    """

    def __init__(
        self, model: nn.Module, modules: dict[str, nn.Module], grad_cfg: GradientConfig,
        deferred: bool,
    ):
        self.model = model
        self.modules = modules
        self.grad_cfg = grad_cfg
        self.deferred = deferred
        self.collector = PerExampleCollector(modules, grad_cfg)
        self.grad_sizes = self.collector.grad_sizes
        self.dim = sum(self.grad_sizes.values())
        self._pending: list[MicroBatch] = []
        self._current: MicroBatch | None = None
        self._forward_open = False
        self._taps: ModuleTaps | None = None
        self._handles: list[Any] = []

    @property
    def pending(self) -> bool:
        """Micro-batches ran since the last :meth:`take_step`."""
        return bool(self._pending)

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        """Hook the model: its forward pass, its target modules and (per batch) its logits."""
        self._taps = ModuleTaps(self.modules, self)
        self._taps.__enter__()
        self._handles = [
            self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            self.model.register_forward_hook(self._post_forward),
        ]

    def detach(self) -> None:
        """Remove every hook from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._taps is not None:
            self._taps.__exit__(None, None, None)
            self._taps = None

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        # The first of several callbacks on one model pops _idx; the rest read it here.
        idx = kwargs.pop(IDX, None)
        if idx is not None:
            module.__dict__[_SEEN_IDX] = idx
        else:
            idx = module.__dict__.get(_SEEN_IDX)
        if idx is None or not module.training or not torch.is_grad_enabled():
            return args, kwargs
        labels = kwargs.get("labels")
        if labels is None:
            raise BadInputError(
                "gradient collection needs the batch's labels passed to the model (a causal "
                "LM collator sets them)"
            )
        labels = labels.detach()
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.detach().bool()
        mb = MicroBatch(idx=idx.detach().long(), labels=labels, mask=mask)
        self.close_live_batch()
        self._current = mb
        self._pending.append(mb)
        if not self.deferred:
            self.collector.begin(mask)
        self._forward_open = True
        return args, kwargs

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        module.__dict__.pop(_SEEN_IDX, None)
        if not self._forward_open:
            return
        self._forward_open = False
        logits = _logits_of(output)
        if logits is None or not logits.requires_grad:
            raise BadInputError(
                f"{type(module).__name__} returned no differentiable logits; gradient "
                "collection needs a causal LM output"
            )
        logits.register_hook(partial(self._on_logits_grad, self._current, logits.detach()))

    def _on_logits_grad(self, mb: MicroBatch, logits: torch.Tensor, grad: torch.Tensor) -> None:
        mb.scale = per_document_scale(logits, grad, mb.labels)  # stays on the device: no sync

    # the tap consumer (gradients/hooks.py): only our micro-batches' a/g are kept
    def on_forward(self, name: str, module: nn.Module, a: torch.Tensor) -> None:
        if not self._forward_open:
            return
        if self.deferred:
            self._current.acts.setdefault(name, []).append(a)
        else:
            self.collector.on_forward(name, module, a)

    def on_backward(self, name: str, module: nn.Module, g: torch.Tensor) -> None:
        mb = self._current
        if mb is None or mb.rows is not None:
            return
        if self.deferred:
            if len(mb.grads.get(name, ())) < len(mb.acts.get(name, ())):
                mb.grads.setdefault(name, []).append(g)
        else:
            self.collector.on_backward(name, module, g)

    # ------------------------------------------------------------------ rows
    def close_live_batch(self) -> None:
        """Live mode: the current micro-batch's backward is done; take its rows."""
        mb = self._current
        if self.deferred or mb is None or mb.rows is not None:
            return
        mb.rows = self._flat(self.collector.finish())

    def take_step(self, normalizers: dict[str, Normalizer] | None) -> tuple[np.ndarray, np.ndarray]:
        """``(idx [M], rows [M, D] float32)`` of the micro-batches finished since the last
        call, each row divided by the trainer's factor on its document's loss (one
        device-to-host copy for the whole optimizer step).

        Deferred mode forms the rows now, normalized by ``normalizers`` (the step's).
        """
        self.close_live_batch()
        if self.deferred:
            for mb in self._pending:
                mb.rows = self._replay(mb, normalizers or {})
        done = [mb for mb in self._pending if mb.rows is not None]
        self._pending = [mb for mb in self._pending if mb.rows is None]
        if not self._pending:
            self._current = None
        if not done:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        scaled = []
        for mb in done:
            if mb.scale is None:
                raise RuntimeError("no gradient reached the logits of a collected batch")
            div = mb.scale.to(mb.rows.device)
            if self.grad_cfg.loss_reduction == "mean":
                div = div * loss_token_counts(mb.labels).to(div)
            scaled.append(mb.rows / div[:, None])
        rows = torch.cat(scaled).cpu().numpy()
        idx = torch.cat([mb.idx.to(scaled[0].device) for mb in done]).cpu().numpy()
        return idx, rows

    def _flat(self, blocks: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([blocks[k] for k in self.grad_sizes], dim=1)

    def _replay(self, mb: MicroBatch, normalizers: dict[str, Normalizer]) -> torch.Tensor:
        """Feed a stashed micro-batch's ``a``/``g`` to the collector with ``normalizers``."""
        col = self.collector
        col.normalizers = normalizers
        col.begin(mb.mask)
        for name, acts in mb.acts.items():
            module = self.modules[name]
            for a in acts:
                col.on_forward(name, module, a)
            for g in mb.grads.get(name, ()):
                col.on_backward(name, module, g)
        rows = self._flat(col.finish())
        mb.acts.clear()
        mb.grads.clear()
        return rows
