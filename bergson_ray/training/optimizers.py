"""Functional AdamW, SGD and Muon with bergson 2.5.1's (torchopt's) update rules.

Why functional: an optimizer step here is ``(params, grads, state) -> (params, state)``
built only from out-of-place tensor ops, so when the gradients carry an autograd graph
(``create_graph=True``) the new parameters are differentiable w.r.t. whatever the
gradients depend on -- the per-document data weights of a metagradient.

State is a plain dict: ``{"step": int, "exp_avg": {...}, "exp_avg_sq": {...},
"momentum": {...}}`` (name -> tensor; a buffer an optimizer does not use is absent).

The rules, with ``g`` the (clipped) gradient, ``lr`` the schedule's value at the step
count before this update and ``t`` the step count after it:

* adamw: ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``;
  ``p -= lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t) + eps_root) + eps) + wd p)``;
* sgd: ``d = g + wd p``; ``buf = momentum buf + d`` (``buf = d`` on the first step);
  ``p -= lr * buf`` (momentum is ``adam_beta1``; 0 = plain SGD);
* muon, 2-D params: Nesterov momentum ``buf = mu buf + g``, ``x = g + mu buf``,
  five quintic Newton-Schulz iterations on ``x / ||x||_F``, scaled by
  ``0.2 sqrt(max(rows, cols))`` (match the RMS of AdamW), plus ``wd p``;
  1-D params: AdamW with ``eps = 1e-8`` (bergson passes no ``adam_eps`` to muon).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config.training import TrainingConfig

Params = dict[str, Tensor]
OptState = dict

MUON_ADAM_EPS = 1e-8
"""Muon's AdamW epsilon for 1-D params: bergson builds muon without ``adam_eps``."""
NS_COEFFS = (3.4445, -4.7750, 2.0315)
"""Quintic Newton-Schulz coefficients (Keller Jordan's Muon), as bergson uses them."""
NS_STEPS = 5
NS_EPS = 1e-7


def init_state(params: Params, cfg: TrainingConfig) -> OptState:
    """Zero optimizer state for ``params`` (what bergson's optimizer ``init`` makes)."""
    zeros = {k: torch.zeros_like(p) for k, p in params.items()}
    if cfg.optimizer == "adamw":
        return {"step": 0, "exp_avg": zeros, "exp_avg_sq": {k: z.clone() for k, z in zeros.items()}}
    if cfg.optimizer == "sgd":
        return {"step": 0, "momentum": zeros} if cfg.adam_beta1 > 0 else {"step": 0}
    if cfg.optimizer == "muon":
        bad = [k for k, p in params.items() if p.ndim > 2]
        if bad:
            raise ValueError(f"muon supports parameters of at most 2 dimensions, not {bad[0]}")
        return {
            "step": 0,
            "momentum": {k: z for k, z in zeros.items() if z.ndim == 2},
            "exp_avg": {k: z for k, z in zeros.items() if z.ndim < 2},
            "exp_avg_sq": {k: z.clone() for k, z in zeros.items() if z.ndim < 2},
        }
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def clip_grads(grads: Params, max_norm: float | None) -> Params:
    """Scale ``grads`` to global norm <= ``max_norm`` (out of place, differentiable).

    ``coef = min(max_norm / (||g|| + 1e-6), 1)``, as bergson / HF Trainer; the squared
    norms are summed in sorted-name order so the result is deterministic.
    """
    if not max_norm:
        return grads
    sq = sum(grads[k].pow(2).sum() for k in sorted(grads))
    coef = (max_norm / (torch.as_tensor(sq).sqrt() + 1e-6)).clamp(max=1.0)
    return {k: g * coef for k, g in grads.items()}


def _adam_direction(
    g: Tensor, m: Tensor, v: Tensor, step: int, b1: float, b2: float, eps: float, eps_root: float
) -> tuple[Tensor, Tensor, Tensor]:
    """New moments and the bias-corrected Adam direction (eps_root inside the sqrt)."""
    m = torch.add(m * b1, g, alpha=1 - b1)
    v = torch.addcmul(v * b2, g, g, value=1 - b2)
    m_hat = m / (1 - b1**step)
    v_hat = v / (1 - b2**step)
    return m, v, m_hat / ((v_hat + eps_root).sqrt() + eps)


def newton_schulz(x: Tensor) -> Tensor:
    """Approximate ``U V^T`` of ``x = U S V^T`` by quintic Newton-Schulz (Muon)."""
    a, b, c = NS_COEFFS
    tall = x.size(0) > x.size(1)
    y = x.T if tall else x
    y = y / y.norm().clamp(min=NS_EPS)
    for _ in range(NS_STEPS):
        gram = y @ y.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.addmm(y, poly, y, beta=a)
    return y.T if tall else y


def step(
    params: Params, grads: Params, state: OptState, lr: float, cfg: TrainingConfig
) -> tuple[Params, OptState]:
    """One update of every parameter in ``grads``; returns new dicts (inputs untouched)."""
    t = state["step"] + 1
    wd = cfg.weight_decay
    b1, b2 = cfg.adam_beta1, cfg.adam_beta2
    new_params: Params = dict(params)
    new_state: OptState = {"step": t}
    for key in ("exp_avg", "exp_avg_sq", "momentum"):
        if key in state:
            new_state[key] = dict(state[key])

    for name in sorted(grads):
        g, p = grads[name], params[name]
        if cfg.optimizer == "adamw":
            m, v, d = _adam_direction(
                g, state["exp_avg"][name], state["exp_avg_sq"][name], t, b1, b2,
                cfg.adam_eps, cfg.eps_root,
            )
            new_state["exp_avg"][name], new_state["exp_avg_sq"][name] = m, v
            if wd:
                d = d + wd * p
        elif cfg.optimizer == "sgd":
            d = g + wd * p if wd else g
            if "momentum" in state:
                d = state["momentum"][name] * b1 + d
                new_state["momentum"][name] = d
        elif p.ndim == 2:  # muon, matrix: Nesterov momentum + orthogonalisation
            buf = state["momentum"][name] * b1 + g
            new_state["momentum"][name] = buf
            ortho = newton_schulz(torch.add(g, buf, alpha=b1))
            d = ortho.to(g.dtype) * (0.2 * math.sqrt(max(p.shape[0], p.shape[1])))
            if wd:
                # detached like bergson's muon: weight decay carries no metagradient
                d = d + wd * p.detach()
        else:  # muon, vector: AdamW
            m, v, d = _adam_direction(
                g, state["exp_avg"][name], state["exp_avg_sq"][name], t, b1, b2,
                MUON_ADAM_EPS, cfg.eps_root,
            )
            new_state["exp_avg"][name], new_state["exp_avg_sq"][name] = m, v
            if wd:
                d = d + wd * p.detach()
        new_params[name] = p + d * (-lr)
    return new_params, new_state


def second_moments(state: OptState) -> dict[str, Tensor]:
    """AdamW's raw second moments by parameter name (empty for sgd / muon matrices)."""
    return dict(state.get("exp_avg_sq", {}))
