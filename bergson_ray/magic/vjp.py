"""One training step, differentiated: the vector-Jacobian product of the MAGIC replay.

Update ``t`` maps ``(theta_t, s_t, w)`` to ``(theta_{t+1}, s_{t+1})``. Given cotangents
``(lam_theta, lam_s)`` on its outputs, :func:`step_vjp` returns the cotangents on
``theta_t`` and ``s_t`` and the contribution ``d <lam, out> / d w`` to the data-weight
metagradient. Everything the trainer does between the gradient and the new state
(clipping, AdamW/SGD/Muon, bias correction) is re-run with autograd on, so the result
is exact for what was trained.

Two ways to build the graph, with the same result up to float rounding:

* one piece (``grad_accum_steps == 1`` and no ``double_backward_batch_size`` split):
  the batch gradient is built with ``create_graph=True`` and one ``autograd.grad``
  goes through gradient, clipping and optimizer at once;
* several pieces: memory stays one piece's graph. Pass 0 recomputes the batch
  gradient ``G`` without a graph; pass A differentiates clipping + optimizer with ``G``
  as a leaf, giving a cotangent ``c`` on ``G``; pass B rebuilds each piece's gradient
  ``g_k`` (its share of the batch loss, same token denominator) with a graph and takes
  ``d <g_k, c> / d (theta, w)``. Because ``G = sum_k g_k`` this adds up to the same VJP.

The training step must draw the same dropout masks as in the forward run: the RNG state
before the step is restored before each pass, and the pieces are then exactly the
trainer's micro-batches (the config rejects a further split under ``--train_mode``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..config.training import TrainingConfig
from ..training import optimizers
from ..training.data import Batch, TokenizedData, collate
from ..training.loop import attention_backend, batch_gradient, batch_weights, micro_slices
from ..training.losses import token_losses, weighted_sum
from .states import State

Grads = dict[str, Tensor]
OptCot = dict[str, dict[str, Tensor]]


@dataclass
class Recipe:
    """What the replay re-runs: the model, the training data and how it was trained."""

    model: nn.Module
    data: TokenizedData
    cfg: TrainingConfig
    double_backward_batch_size: int | None = None
    """Largest number of rows in one double-backward graph (None = whole micro-batches)."""


def buffers(opt_state: dict) -> dict[str, dict[str, Tensor]]:
    """The optimizer's float buffers (the differentiable part of its state)."""
    return {k: v for k, v in opt_state.items() if isinstance(v, dict)}


def zero_cotangent(opt_state: dict) -> OptCot:
    """Zero cotangents shaped like the optimizer's buffers (the replay's start value)."""
    return {k: {n: torch.zeros_like(t) for n, t in v.items()} for k, v in buffers(opt_state).items()}


def pieces(num_rows: int, cfg: TrainingConfig, dbs: int | None) -> list[slice]:
    """The trainer's micro-batches, each further cut into runs of at most ``dbs`` rows."""
    out = []
    for sl in micro_slices(num_rows, cfg.grad_accum_steps):
        size = dbs or (sl.stop - sl.start)
        out.extend(slice(a, min(a + size, sl.stop)) for a in range(sl.start, sl.stop, size))
    return out


def _leaves(state: State) -> tuple[Grads, OptCot]:
    params = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
    bufs = {
        kind: {n: t.detach().requires_grad_(True) for n, t in group.items()}
        for kind, group in buffers(state.opt_state).items()
    }
    return params, bufs


def _with_buffers(opt_state: dict, bufs: OptCot) -> dict:
    return {**opt_state, **bufs}


def _grad(outs: list[Tensor], ins: list[Tensor], cots: list[Tensor] | None) -> list[Tensor]:
    """``autograd.grad`` that returns zeros for inputs the outputs do not depend on."""
    keep = [i for i, o in enumerate(outs) if o.requires_grad]
    got = torch.autograd.grad(
        [outs[i] for i in keep],
        ins,
        None if cots is None else [cots[i] for i in keep],
        allow_unused=True,
    )
    return [g if g is not None else torch.zeros_like(x) for g, x in zip(got, ins)]


def _update_vjp(
    state: State, lam_p: Grads, lam_s: OptCot, lr: float, cfg: TrainingConfig,
    grad_fn: Callable[[Grads], Grads],
) -> tuple[list[Tensor], Grads, OptCot, list[Tensor], list[str], list[tuple[str, str]]]:
    """Re-run clip + optimizer step on leaves with a graph; ``grad_fn(params)`` gives the
    raw gradient. Returns the outputs, the leaves and the matching cotangents."""
    params, bufs = _leaves(state)
    grads = grad_fn(params)
    clipped = optimizers.clip_grads(grads, cfg.max_grad_norm)
    new_p, new_s = optimizers.step(params, clipped, _with_buffers(state.opt_state, bufs), lr, cfg)
    names = list(params)
    buf_keys = [(k, n) for k, g in bufs.items() for n in g]
    outs = [new_p[k] for k in names] + [new_s[k][n] for k, n in buf_keys]
    cots = [lam_p[k] for k in names] + [lam_s[k][n] for k, n in buf_keys]
    return outs, params, bufs, cots, names, buf_keys


def step_vjp(
    recipe: Recipe,
    state: State,
    batch: Batch,
    lr: float,
    weights: Tensor,
    lam_p: Grads,
    lam_s: OptCot,
) -> tuple[Grads, OptCot, Tensor]:
    """Cotangents on ``(theta_t, s_t)`` and the weight-gradient of update ``t``."""
    cfg = recipe.cfg
    cuts = pieces(len(batch.rows), cfg, recipe.double_backward_batch_size)
    if len(cuts) == 1:
        return _single_shot(recipe, state, batch, lr, weights, lam_p, lam_s)
    return _by_pieces(recipe, state, batch, lr, weights, lam_p, lam_s, cuts)


def _single_shot(
    recipe: Recipe, state: State, batch: Batch, lr: float, weights: Tensor, lam_p: Grads,
    lam_s: OptCot,
) -> tuple[Grads, OptCot, Tensor]:
    cfg = recipe.cfg
    w = weights.detach().requires_grad_(True)
    torch.set_rng_state(state.rng)

    def grad_fn(params: Grads) -> Grads:
        return batch_gradient(recipe.model, params, recipe.data, batch, w, cfg, create_graph=True)[0]

    outs, params, bufs, cots, names, buf_keys = _update_vjp(state, lam_p, lam_s, lr, cfg, grad_fn)
    ins = [params[k] for k in names] + [bufs[k][n] for k, n in buf_keys] + [w]
    got = _grad(outs, ins, cots)
    new_lp = dict(zip(names, got[: len(names)]))
    new_ls: OptCot = {k: {} for k in bufs}
    for (k, n), g in zip(buf_keys, got[len(names) : -1]):
        new_ls[k][n] = g
    return new_lp, new_ls, got[-1]


def piece_gradient(
    recipe: Recipe, params: Grads, ids: Tensor, labels: Tensor, w_rows: Tensor, piece: slice,
    batch_tokens: int,
) -> Grads:
    """Gradient (with graph) of one piece's share of the batch loss."""
    cfg = recipe.cfg
    with attention_backend(True):
        logits = functional_call(recipe.model, params, (ids[piece],), {"use_cache": False}).logits
    tok, valid = token_losses(logits, labels[piece])
    loss = weighted_sum(tok, valid, w_rows[piece], cfg.loss_reduction, batch_tokens)
    names = list(params)
    got = torch.autograd.grad(loss, [params[k] for k in names], create_graph=True, allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(params[k])) for k, g in zip(names, got)}


def _by_pieces(
    recipe: Recipe, state: State, batch: Batch, lr: float, weights: Tensor, lam_p: Grads,
    lam_s: OptCot, cuts: list[slice],
) -> tuple[Grads, OptCot, Tensor]:
    cfg = recipe.cfg
    # pass 0: the batch gradient exactly as the forward run computed it
    torch.set_rng_state(state.rng)
    plain = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
    with torch.enable_grad():
        full, _ = batch_gradient(recipe.model, plain, recipe.data, batch, weights.detach(), cfg)
    g_leaf = {k: v.detach().requires_grad_(True) for k, v in full.items()}
    # pass A: clip + optimizer with the gradient as a leaf
    outs, params, bufs, cots, names, buf_keys = _update_vjp(
        state, lam_p, lam_s, lr, cfg, lambda _p: g_leaf
    )
    ins = [params[k] for k in names] + [bufs[k][n] for k, n in buf_keys] + [g_leaf[k] for k in names]
    got = _grad(outs, ins, cots)
    k_p = len(names)
    new_lp = dict(zip(names, got[:k_p]))
    new_ls: OptCot = {k: {} for k in bufs}
    for (k, n), g in zip(buf_keys, got[k_p : k_p + len(buf_keys)]):
        new_ls[k][n] = g
    c = dict(zip(names, got[k_p + len(buf_keys) :]))
    # pass B: each piece's gradient, contracted with c, differentiated w.r.t. theta and w
    ids, labels = collate(recipe.data, batch.rows)
    batch_tokens = int((labels[:, 1:] != -100).sum())
    w = weights.detach().requires_grad_(True)
    dw = torch.zeros_like(weights)
    torch.set_rng_state(state.rng)
    for piece in cuts:
        p2 = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
        w_rows = batch_weights(w, batch, ids.shape[1])
        g = piece_gradient(recipe, p2, ids, labels, w_rows, piece, batch_tokens)
        dot = sum((g[k] * c[k]).sum() for k in names)
        d = _grad([dot], [p2[k] for k in names] + [w], None)
        for k, gk in zip(names, d[:-1]):
            new_lp[k] = new_lp[k] + gk
        dw = dw + d[-1]
    return new_lp, new_ls, dw
