"""Batches in, per-module Hessian statistics out: the work of one Hessian worker.

:class:`FactorFitter` runs the Fisher loss (``fisher.py``) forward and backward
through the module taps and feeds each module's ``(a, g, mask)`` to its
accumulator: KFAC-family factors in the first pass, EK-FAC eigenvalue
corrections (given the eigenbases) in the second. :class:`GramFitter` feeds the
gradient engine's processed rows to dense Gram accumulators (autocorrelation).

Both only *add*: a worker calls ``accumulate`` for as many batches as it likes
and ships ``state_dicts()`` once, so the traffic to the shard actors does not
grow with the number of batches. Nothing here knows about Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from ..config import GradientConfig, HessianConfig
from ..gradients.head_loss import head_split, last_hidden
from ..gradients.hooks import InputGradSwitch, ModuleTaps
from ..gradients.losses import collection_mask
from ..gradients.modules import find_target_modules, weight_shape
from ..gradients.moe import RowLayout
from ..utils.columns import column_offsets
from ..utils.dtypes import torch_dtype
from .accumulator import SummedState
from .autocorrelation import GramAccumulator
from .ev_correction import EigenCorrectionAccumulator
from .fisher import fisher_loss, fisher_loss_from_hidden
from .specs import ModuleSpec, empty_factor_accumulators

log = logging.getLogger(__name__)


def module_specs(model: nn.Module, grad_cfg: GradientConfig) -> dict[str, ModuleSpec]:
    """Target modules (bergson's names and order) with their ``(O, I, bias)``."""
    out = {}
    for name, mod in find_target_modules(model, grad_cfg).items():
        o, i = weight_shape(mod)
        bias = bool(grad_cfg.include_bias and getattr(mod, "bias", None) is not None)
        out[name] = ModuleSpec(o, i, bias)
    return out


class _TapRouter:
    """Tap consumer: keeps each module's input until its output gradient arrives.

    A fused MoE expert also hands over the router's assignment (``RowLayout.routed``),
    read in the forward pass while its layout is set, so that its statistics count the
    positions routed to it rather than all of them.
    """

    def __init__(self, accumulators: Mapping[str, SummedState]):
        self.accumulators = accumulators
        self.mask: torch.Tensor | None = None
        self._inputs: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def on_forward(self, name: str, module: nn.Module, a: torch.Tensor) -> None:
        layout = getattr(module, "row_layout", None)
        routed = layout.routed() if isinstance(layout, RowLayout) else None
        # A reference, not a copy: autograd keeps this tensor alive anyway.
        self._inputs[name] = (a, routed)

    def on_backward(self, name: str, module: nn.Module, g: torch.Tensor) -> None:
        a, routed = self._inputs.pop(name)
        self.accumulators[name].update(a, g, self.mask, routed)  # type: ignore[attr-defined]


class FactorFitter:
    """Accumulates factor statistics (or EK-FAC corrections) of a model's target modules.

    ``eigenbases`` (module -> ``(Q_A, Q_G)``) switches to the EK-FAC correction pass.
    """

    def __init__(
        self,
        model: nn.Module,
        grad_cfg: GradientConfig,
        hessian_cfg: HessianConfig,
        *,
        eigenbases: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.model = model.eval().requires_grad_(False)
        self.grad_cfg = grad_cfg
        self.cfg = hessian_cfg
        self.modules = find_target_modules(model, grad_cfg)
        self.specs = module_specs(model, grad_cfg)
        self.device = next(model.parameters()).device
        dtype = torch_dtype(hessian_cfg.hessian_dtype)
        if eigenbases is None:
            self.accumulators = empty_factor_accumulators(self.specs, hessian_cfg, str(self.device))
        else:
            missing = set(self.specs) - set(eigenbases)
            if missing:
                raise ValueError(f"no eigenbasis for module(s) {sorted(missing)}")
            self.accumulators = {
                name: EigenCorrectionAccumulator(
                    *eigenbases[name], bias=s.bias, dtype=dtype, device=self.device
                )
                for name, s in self.specs.items()
            }
        self.router = _TapRouter(self.accumulators)
        self.num_positions = 0
        self.num_batches = 0

    def accumulate(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        lengths: torch.Tensor,
        doc_ids: torch.Tensor,
    ) -> int:
        """One right-padded batch forward and backward; returns its collected positions."""
        input_ids = input_ids.to(self.device)
        labels = labels.to(self.device)
        lengths = torch.as_tensor(lengths, device=self.device)
        mask = collection_mask(lengths, input_ids.shape[1])
        self.router.mask = mask
        with (
            torch.enable_grad(),
            InputGradSwitch(self.model),
            ModuleTaps(self.modules, self.router),
        ):
            kw = dict(
                doc_ids=torch.as_tensor(doc_ids),
                use_dataset_labels=self.cfg.use_dataset_labels,
                seed=self.cfg.seed,
                reduction=self.grad_cfg.loss_reduction,
            )
            split = head_split(self.model)  # the loss without whole logits where it can
            if split is None:
                loss = fisher_loss(self.model(input_ids).logits, labels, lengths, **kw)
            else:
                body, head = split
                hidden = last_hidden(body, input_ids)
                loss = fisher_loss_from_hidden(hidden, head, labels, lengths, **kw)
            loss.backward()
        if self.router._inputs:  # a module ran forward but got no gradient
            stale = sorted(self.router._inputs)
            self.router._inputs.clear()
            raise RuntimeError(f"no output gradient reached module(s) {stale[:5]}")
        n = int(mask.sum())
        self.num_positions += n
        self.num_batches += 1
        return n

    def accumulate_batch(self, batch, doc_ids) -> int:
        """A ``data.batching.PackedBatch`` (``input_ids``, ``labels``, ``lengths``)."""
        return self.accumulate(batch.input_ids, batch.labels, batch.lengths, doc_ids)

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Module -> the accumulator's running sums (CPU tensors)."""
        return {
            k: {n: t.cpu() for n, t in a.state_dict().items()} for k, a in self.accumulators.items()
        }

    def reset(self) -> None:
        for a in self.accumulators.values():
            a.reset()
        self.num_positions = self.num_batches = 0


class GramFitter:
    """Dense second moments of the engine's processed rows, per stored block."""

    def __init__(self, engine, hessian_cfg: HessianConfig):
        self.engine = engine
        dtype = torch_dtype(hessian_cfg.hessian_dtype)
        self.accumulators = {
            name: GramAccumulator(size, dtype=dtype) for name, size in engine.grad_sizes.items()
        }
        self.num_batches = 0

    def add_rows(self, rows: torch.Tensor, num_rows: int | None = None) -> None:
        """Split flat ``[R, D]`` rows by ``grad_sizes`` and add each block's Gram."""
        for name, (lo, hi) in column_offsets(self.engine.grad_sizes).items():
            self.accumulators[name].update_rows(rows[:, lo:hi], num_rows)

    def add_empty_rows(self, n: int) -> None:
        """Rows that exist but are zero (documents with < 2 tokens)."""
        for acc in self.accumulators.values():
            acc.add_rows_count(n)

    def accumulate_batch(self, batch) -> int:
        res = self.engine.compute(batch)
        rows = res.token_rows if res.rows is None else res.rows
        self.add_rows(rows.float())
        self.num_batches += 1
        return int(rows.shape[0])

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            k: {n: t.cpu() for n, t in a.state_dict().items()} for k, a in self.accumulators.items()
        }

    def reset(self) -> None:
        for a in self.accumulators.values():
            a.reset()
        self.num_batches = 0
