"""MAGIC's two passes: the forward training run that saves states, and the REPLAY
reverse pass that turns a query gradient into exact data-weight metagradients.

Forward (:func:`forward`): the shared trainer runs with the data weights (all ones) as
an input and, through its ``on_checkpoint`` hook, hands each scheduled state (before
update ``i``) to a :class:`~bergson_ray.magic.states.StateStore` together with the RNG
state; the final state is kept too.

Reverse (:func:`reverse`), from the last update to the first: restore the nearest saved
state at or before ``t``, recompute (no graph) up to ``t`` with the trainer's own step,
re-run update ``t`` with a graph and take one VJP (``vjp.step_vjp``) onto the previous
parameters, optimizer buffers and weights. The weight parts add up to
``d L_query(theta_T(w)) / d w``. Intermediate states recomputed on the way are kept in
memory: every one of them for ``all``/``sqrt`` (a segment is at most sqrt(T) states),
only the midpoint of each recomputed gap for ``log`` (bergson's recursive halving:
O(T log T) recomputation, O(log T) memory). Recomputation is bit-identical to the
forward run (same functions, deterministic kernels), so every schedule gives the same
scores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..training import optimizers
from ..training.data import batch_order
from ..training.loop import batch_gradient, run_context, train
from ..training.schedules import lr_schedule
from .backward_state import BackwardState, load_backward, save_backward
from .states import State, StateStore
from .vjp import Grads, Recipe, step_vjp, zero_cotangent

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(done, total)`` after each reverse step."""


def initial_weights(recipe: Recipe, per_token: bool) -> Tensor:
    """All-ones data weights: ``[N]`` per document or ``[N, max_length]`` per token."""
    dtype = next(recipe.model.parameters()).dtype
    n = len(recipe.data)
    return torch.ones(n, recipe.data.max_length, dtype=dtype) if per_token else torch.ones(n, dtype=dtype)


def forward(recipe: Recipe, weights: Tensor, store: StateStore) -> State:
    """Train once, saving the ``save_mode`` states into ``store``; return the final state."""
    cfg = recipe.cfg

    def keep(step: int, params: dict[str, Tensor], opt_state: dict) -> None:
        store.save(step, State(params, opt_state, torch.get_rng_state()))

    result = train(recipe.model, recipe.data, cfg, weights, on_checkpoint=keep)
    final = State(result.params, result.opt_state, torch.get_rng_state())
    store.save_final(final)
    return final.detached()


def advance(recipe: Recipe, state: State, step: int, batch, lr: float, weights: Tensor) -> State:
    """Update ``step`` exactly as the trainer runs it (no graph kept)."""
    torch.set_rng_state(state.rng)
    cur = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
    with torch.enable_grad():
        grads, _ = batch_gradient(recipe.model, cur, recipe.data, batch, weights, recipe.cfg)
        grads = optimizers.clip_grads(grads, recipe.cfg.max_grad_norm)
        new_p, new_s = optimizers.step(cur, grads, state.opt_state, lr, recipe.cfg)
    return State(
        {k: v.detach() for k, v in new_p.items()},
        {k: ({n: t.detach() for n, t in v.items()} if isinstance(v, dict) else v) for k, v in new_s.items()},
        torch.get_rng_state(),
    )


class StateWalker:
    """Hands out the state before update ``t`` for ``t`` = T-1, T-2, ..., 0."""

    def __init__(self, recipe: Recipe, store: StateStore, weights: Tensor, halve: bool):
        self.recipe, self.store, self.weights, self.halve = recipe, store, weights, halve
        cfg = recipe.cfg
        self.batches = batch_order(len(recipe.data), cfg.batch_size, cfg.num_epochs, cfg.seed)
        self.schedule = lr_schedule(cfg.lr_schedule, len(self.batches))
        self.saved = set(store.steps())
        self.stash: dict[int, State] = {}
        self.recomputed = 0

    def state_at(self, t: int) -> State:
        for k in [k for k in self.stash if k > t]:
            del self.stash[k]
        if t in self.stash:
            return self.stash.pop(t)
        starts = [k for k in (*self.saved, *self.stash) if k <= t]
        if not starts:
            raise FileNotFoundError(f"no saved training state at or before step {t}")
        k = max(starts)
        state = self.stash[k] if k in self.stash else self.store.load(k)
        mid = k + (t - k) // 2
        for i in range(k, t):
            if i > k and (not self.halve or i == mid):
                self.stash[i] = state
            state = advance(self.recipe, state, i, self.batches[i], self.schedule(i), self.weights)
            self.recomputed += 1
        return state


def reverse(
    recipe: Recipe,
    store: StateStore,
    cotangent: Grads,
    weights: Tensor,
    *,
    backward_path: str | Path | None = None,
    save_every: int = 0,
    progress: Progress | None = None,
) -> Tensor:
    """``d <cotangent, theta_T(w)> / d w`` at ``weights`` (same shape as ``weights``).

    ``backward_path`` + ``save_every`` > 0: the reverse pass's own state is written
    there every ``save_every`` updates and picked up again by a rerun (resume); the
    file is removed when the pass finishes.
    """
    cfg = recipe.cfg
    walker = StateWalker(recipe, store, weights, halve=cfg.save_mode == "log")
    n = len(walker.batches)
    if not walker.saved:
        raise FileNotFoundError("the forward run saved no training states")
    first = store.load(min(walker.saved))
    bw = BackwardState(
        n - 1,
        {k: v.detach().clone() for k, v in cotangent.items()},
        zero_cotangent(first.opt_state),
        torch.zeros_like(weights),
    )
    path = Path(backward_path) if backward_path else None
    if path is not None and path.is_file():
        bw = load_backward(path)
        log.info("resuming the reverse pass at step %d", bw.next_step)
    with run_context(cfg, cfg.deterministic, cfg.torch_threads or None), torch.enable_grad():
        was = recipe.model.training
        recipe.model.train(cfg.train_mode)
        try:
            for t in range(bw.next_step, -1, -1):
                state = walker.state_at(t)
                lam_p, lam_s, dw = step_vjp(
                    recipe, state, walker.batches[t], walker.schedule(t), weights, bw.lam_params, bw.lam_state
                )
                bw = BackwardState(t - 1, lam_p, lam_s, bw.weight_grads + dw)
                if path is not None and save_every and t > 0 and (n - t) % save_every == 0:
                    save_backward(path, bw)
                if progress is not None:
                    progress(n - t, n)
        finally:
            recipe.model.train(was)
    if path is not None and path.exists():
        path.unlink()
    return bw.weight_grads.detach()
