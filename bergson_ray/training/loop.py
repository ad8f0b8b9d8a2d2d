"""The training loop: functional steps over bergson's batch order.

``train`` never touches the module's own parameters: it copies them into a dict, runs
the forward with ``torch.func.functional_call`` and updates the dict out of place
(``optimizers.step``). With ``create_graph=True`` and ``weights.requires_grad`` the
returned parameters are differentiable w.r.t. the weights (metagradients).

Determinism: the same config, data and weights give bit-identical parameters. The run
seeds torch's RNG with ``cfg.seed`` inside a forked RNG (the caller's RNG is left as it
was), optionally fixes the thread count, and turns on deterministic algorithms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..config.training import TrainingConfig
from ..utils.malloc import keep_freed_memory
from .checkpoints import checkpoint_steps
from .data import Batch, TokenizedData, batch_order, collate
from .losses import doc_mean_losses, token_losses, weighted_sum
from .optimizers import clip_grads, init_state
from .optimizers import step as optimizer_step
from .schedules import lr_schedule

CheckpointFn = Callable[[int, dict[str, Tensor], dict], None]
"""``on_checkpoint(step, params, opt_state)``: state *before* update ``step``."""


@dataclass
class TrainResult:
    """What a run produced."""

    params: dict[str, Tensor]
    """Final trainable parameters by name (``model.named_parameters()`` names)."""
    opt_state: dict
    """Final optimizer state (see ``optimizers``); ``opt_state["step"]`` = updates made."""
    log_history: list[dict] = field(default_factory=list)
    """One entry per update: ``step`` (from 1), ``learning_rate``, ``loss``."""
    checkpoints: list[int] = field(default_factory=list)
    """Steps whose state was handed to ``on_checkpoint`` (bergson's save schedule)."""


def initial_params(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the model's trainable parameters (tied weights once)."""
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def run_context(cfg: TrainingConfig, deterministic: bool, threads: int | None) -> Iterator[None]:
    """Forked, seeded RNG; fixed threads and deterministic kernels; all restored after."""
    keep_freed_memory()  # no page faults on the tensors every step re-allocates
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if threads:
            torch.set_num_threads(threads)
        if deterministic:
            torch.use_deterministic_algorithms(True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def batch_weights(weights: Tensor, batch: Batch, width: int) -> Tensor:
    """The rows' weights (pad rows 0): ``[B]``, or ``[B, width - 1]`` per position."""
    rows = torch.tensor(batch.rows, dtype=torch.long)
    w = weights[rows] if weights.ndim == 1 else weights[rows, : width - 1]
    if batch.pad:
        keep = torch.ones(len(batch.rows), dtype=w.dtype)
        keep[len(batch.rows) - batch.pad :] = 0
        w = w * (keep if w.ndim == 1 else keep[:, None])
    return w


def attention_backend(create_graph: bool) -> contextlib.AbstractContextManager:
    """The math SDPA kernel when a step must be differentiated twice (the fused CPU
    kernels have no double backward); otherwise torch's choice."""
    if not create_graph:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def micro_slices(n: int, parts: int) -> list[slice]:
    """bergson's split: ``parts`` near-equal slices, the first ``n % parts`` one longer."""
    parts = max(1, min(parts, n))
    sizes = [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
    out, start = [], 0
    for s in sizes:
        out.append(slice(start, start + s))
        start += s
    return out


def batch_gradient(
    model: nn.Module,
    params: dict[str, Tensor],
    data: TokenizedData,
    batch: Batch,
    weights: Tensor,
    cfg: TrainingConfig,
    *,
    create_graph: bool = False,
) -> tuple[dict[str, Tensor], float]:
    """Gradient of the batch's weighted loss w.r.t. ``params`` (micro-batched), and the loss."""
    ids, labels = collate(data, batch.rows)
    w = batch_weights(weights, batch, ids.shape[1])
    total_tokens = int((labels[:, 1:] != -100).sum())
    names = list(params)
    grads: dict[str, Tensor] | None = None
    loss_value = 0.0
    for sl in micro_slices(len(batch.rows), cfg.grad_accum_steps):
        with attention_backend(create_graph):
            logits = functional_call(model, params, (ids[sl],), {"use_cache": False}).logits
        tok, valid = token_losses(logits, labels[sl])
        loss = weighted_sum(tok, valid, w[sl], cfg.loss_reduction, total_tokens)
        loss_value += float(loss.detach())
        got = torch.autograd.grad(
            loss, [params[k] for k in names], create_graph=create_graph, allow_unused=True
        )
        micro = {k: (g if g is not None else torch.zeros_like(params[k])) for k, g in zip(names, got)}
        grads = micro if grads is None else {k: grads[k] + micro[k] for k in names}
    assert grads is not None
    return grads, loss_value


def _check_weights(weights: Tensor | None, data: TokenizedData, dtype: torch.dtype) -> Tensor:
    n = len(data)
    if weights is None:
        return torch.ones(n, dtype=dtype)
    if weights.ndim not in (1, 2) or weights.shape[0] != n:
        raise ValueError(f"weights must have shape [{n}] or [{n}, T], got {tuple(weights.shape)}")
    if weights.ndim == 2 and weights.shape[1] < data.max_length:
        raise ValueError(f"per-token weights need at least {data.max_length} columns")
    return weights


def train(
    model: nn.Module,
    data: TokenizedData,
    cfg: TrainingConfig,
    weights: Tensor | None = None,
    *,
    params: dict[str, Tensor] | None = None,
    on_checkpoint: CheckpointFn | None = None,
    create_graph: bool = False,
    deterministic: bool | None = None,
    num_threads: int | None = None,
) -> TrainResult:
    """Train ``model``'s parameters on ``data`` with bergson's semantics; return them.

    ``weights``: ``[N]`` per document or ``[N, T]`` per position (``None`` = all ones,
    bit-identical to ``torch.ones(N)``). ``params``: start from these instead of the
    model's own. ``create_graph``: keep the autograd graph through every step, so the
    result is differentiable w.r.t. ``weights`` (and ``params``). ``deterministic`` and
    ``num_threads`` default to ``cfg.deterministic`` / ``cfg.torch_threads``.
    """
    det = cfg.deterministic if deterministic is None else deterministic
    threads = cfg.torch_threads if num_threads is None else num_threads
    start = params if params is not None else initial_params(model)
    dtype = next(iter(start.values())).dtype
    w = _check_weights(weights, data, dtype)
    batches = batch_order(len(data), cfg.batch_size, cfg.num_epochs, cfg.seed)
    n = len(batches)
    schedule = lr_schedule(cfg.lr_schedule, n)
    saves = set(checkpoint_steps(n, cfg.save_mode, cfg.save_interval)) if on_checkpoint else set()
    was_training = model.training
    model.train(cfg.train_mode)
    history: list[dict] = []
    try:
        with run_context(cfg, det, threads):
            cur = {k: (v if create_graph else v.detach()) for k, v in start.items()}
            state = init_state(cur, cfg)
            for i, batch in enumerate(batches):
                if i in saves:
                    on_checkpoint(i, cur, state)  # type: ignore[misc]
                if not create_graph:
                    cur = {k: v.detach().requires_grad_(True) for k, v in cur.items()}
                elif not all(v.requires_grad for v in cur.values()):
                    cur = {
                        k: v if v.requires_grad else v.detach().requires_grad_(True)
                        for k, v in cur.items()
                    }
                with torch.enable_grad():  # also under a caller's no_grad()
                    grads, loss = batch_gradient(
                        model, cur, data, batch, w, cfg, create_graph=create_graph
                    )
                    grads = clip_grads(grads, cfg.max_grad_norm)
                    lr = schedule(i)
                    cur, state = optimizer_step(cur, grads, state, lr, cfg)
                if not create_graph:
                    cur = {k: v.detach() for k, v in cur.items()}
                    state = _detach_state(state)
                history.append({"step": i + 1, "learning_rate": float(lr), "loss": loss})
            if n in saves:
                on_checkpoint(n, cur, state)  # type: ignore[misc]
    finally:
        model.train(was_training)
    return TrainResult(cur, state, history, sorted(saves))


def _detach_state(state: dict) -> dict:
    return {k: ({n: t.detach() for n, t in v.items()} if isinstance(v, dict) else v) for k, v in state.items()}


def doc_losses(
    model: nn.Module, params: dict[str, Tensor] | None, data: TokenizedData, batch_size: int = 16
) -> Tensor:
    """Each document's mean token loss under ``params`` (default: the model's own), ``[N]``.

    Runs in eval mode; differentiable w.r.t. ``params`` when grad mode is on (the
    query loss of a metagradient), otherwise call it under ``torch.no_grad()``.
    """
    p = params if params is not None else initial_params(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(data), batch_size):
            rows = tuple(range(start, min(start + batch_size, len(data))))
            ids, labels = collate(data, rows)
            logits = functional_call(model, p, (ids,), {"use_cache": False}).logits
            out.append(doc_mean_losses(*token_losses(logits, labels)))
    finally:
        model.train(was_training)
    return torch.cat(out)
