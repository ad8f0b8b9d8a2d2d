"""Normalizers read from a *live* optimizer's second moments, right after its step.

The row stored for an example trained at step ``t`` should be the update the optimizer
applied for it, ``lr_t * g / sqrt(v̂_t)``, with ``v̂_t`` the moments Adam used at that very
step: its running average *including* step ``t``'s gradient, divided by Adam's bias
correction ``1 - beta2^t``. So we read the state after ``optimizer.step()`` and before
the scheduler moves the learning rate, and build :mod:`~bergson_ray.gradients.normalizers`
objects the collector already knows how to apply.

Adafactor (``exp_avg_sq_row`` / ``exp_avg_sq_col``) needs no correction: its decay
``beta2_t = 1 - t^c`` is 0 at the first step, so its averages are unbiased from the start.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..gradients.modules import Conv1D, base_model, weight_shape
from ..gradients.normalizers import ADAM_EPS, AdafactorNormalizer, AdamNormalizer, Normalizer

log = logging.getLogger(__name__)


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's (or anyone's) ``.optimizer`` wrappers."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def _adam_corrected(state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
    """``exp_avg_sq / (1 - beta2^step)``: the second moment Adam divided by at this step.

    A step count kept on an accelerator (fused or capturable Adam) is used there, in
    float64 like the host path, rather than read back (a sync per module and step).
    """
    v = state["exp_avg_sq"].detach().float()
    betas = group.get("betas")
    step = state.get("step", 0)
    if betas is None:
        return v
    beta2 = float(betas[1])
    if isinstance(step, torch.Tensor) and step.device.type != "cpu":
        step = step.detach().to(torch.float64)
        correction = torch.where(step > 0, 1.0 - torch.pow(beta2, step), 1.0)
        return v / correction.to(v.dtype)
    step = float(step.item() if isinstance(step, torch.Tensor) else step)
    return v if step <= 0 else v / (1.0 - beta2**step)


def _scalar_eps(group: dict[str, Any]) -> float:
    """Adam's ``eps`` (Adafactor keeps a pair there; its biases use Adam's default)."""
    eps = group.get("eps")
    return float(eps) if isinstance(eps, (int, float)) else ADAM_EPS


def _adam_stored(v_hat: torch.Tensor, eps: float, lr: float) -> torch.Tensor:
    """The ``*_avg_sq`` an :class:`AdamNormalizer` needs to scale by ``lr / (sqrt(v̂) + eps)``.

    That is the optimizer's own step size per element (torch's Adam divides by
    ``sqrt(v̂) + eps``). The normalizer divides by ``sqrt(stored) + ADAM_EPS``, so we store
    ``((sqrt(v̂) + eps) / lr - ADAM_EPS)^2``. bergson divides ``v`` by ``lr^2`` instead, which
    shrinks the optimizer's ``eps`` by ``lr`` and makes elements whose batch gradient
    nearly cancels (``v̂`` tiny) blow up far more than the optimizer's update does.
    """
    return _stored_of_scale(_adam_scale(v_hat, eps, lr))


def _adam_scale(v_hat: torch.Tensor, eps: float, lr: float) -> torch.Tensor:
    """``lr / (sqrt(v̂) + eps)``, the optimizer's per-element step (one new tensor)."""
    return v_hat.sqrt().add_(eps).reciprocal_().mul_(lr)


def _stored_of_scale(scale: torch.Tensor) -> torch.Tensor:
    """The ``*_avg_sq`` whose :meth:`AdamNormalizer.weight_scale` is ``scale``."""
    return (scale.reciprocal() - ADAM_EPS).clamp_min(0.0).square()


class StepAdamNormalizer(AdamNormalizer):
    """An :class:`AdamNormalizer` built from the per-element step ``lr / (sqrt(v̂) + eps)``.

    The collector multiplies every micro-batch's gradients by that step; holding it
    directly spares the round trip through ``*_avg_sq`` (a square, a square root and two
    reciprocals over every weight, per module and step). ``weight_avg_sq`` (what a
    saved store records) is derived on demand only.
    """

    def __init__(self, weight_scale: torch.Tensor, bias_avg_sq: torch.Tensor | None = None):
        self._weight_scale = weight_scale
        self.bias_avg_sq = bias_avg_sq

    @property
    def weight_avg_sq(self) -> torch.Tensor:  # type: ignore[override]
        return _stored_of_scale(self._weight_scale)

    def weight_scale(self) -> torch.Tensor:
        return self._weight_scale

    def head(self, lo: int, hi: int) -> StepAdamNormalizer:
        b = None if self.bias_avg_sq is None else self.bias_avg_sq[lo:hi]
        return StepAdamNormalizer(self._weight_scale[lo:hi], b)


def live_normalizers(
    optimizer: Any,
    model: nn.Module,
    modules: dict[str, nn.Module],
    *,
    include_bias: bool,
    scale_by_lr: bool,
) -> dict[str, Normalizer]:
    """One normalizer per module of ``modules`` (names relative to ``base_model(model)``)
    from ``optimizer``'s current state; modules without moments get none.

    Adam rows are scaled by ``lr / (sqrt(v̂) + eps)`` (without ``scale_by_lr``:
    ``1 / (sqrt(v̂) + eps)``), the optimizer's own per-element step; Adafactor rows by
    ``lr / sqrt(V)``.
    """
    opt = unwrap_optimizer(optimizer)
    param_group: dict[int, dict[str, Any]] = {
        id(p): g for g in opt.param_groups for p in g["params"]
    }
    root = base_model(model)
    out: dict[str, Normalizer] = {}
    for name, mod in modules.items():
        weight = getattr(mod, "weight", None)
        if weight is None or id(weight) not in param_group:
            continue
        state = opt.state.get(weight) or {}
        group = param_group[id(weight)]
        lr = float(group.get("lr") or 1.0) if scale_by_lr else 1.0
        eps = _scalar_eps(group)
        conv = bool(Conv1D) and isinstance(mod, Conv1D)
        bias_sq = None
        bias = getattr(mod, "bias", None)
        if include_bias and bias is not None and id(bias) in param_group:
            bstate = opt.state.get(bias) or {}
            if "exp_avg_sq" in bstate:
                bias_sq = _adam_stored(_adam_corrected(bstate, param_group[id(bias)]), eps, lr)
        if "exp_avg_sq_row" in state:
            row = state["exp_avg_sq_row"].detach().float()
            col = state["exp_avg_sq_col"].detach().float()
            if conv:  # Conv1D stores [I, O]: its "rows" are our columns
                row, col = col, row
            # V = r c^T / mean(r) is invariant to scaling r: the lr goes on the columns
            out[name] = AdafactorNormalizer(row, col / lr**2, bias_sq)
        elif "exp_avg_sq" in state:
            v = _adam_corrected(state, group)
            v = v.t() if conv else v
            if tuple(v.shape) != weight_shape(mod):
                log.debug("%s: moment shape %s is not the weight's; skipped", name, tuple(v.shape))
                continue
            out[name] = StepAdamNormalizer(_adam_scale(v, eps, lr).contiguous(), bias_sq)
    if not out and modules:
        log.debug("optimizer %s holds no second moments for %s", type(opt).__name__, type(root).__name__)
    return out
