"""A functional trainer in pure torch, with bergson 2.5.1's training semantics.

Shared by ``train`` (one run, written to a run dir), ``validate`` (leave-k-out
retraining: the same data trained many times with different document weights),
``magic`` (metagradients: the update is differentiable w.r.t. the data weights) and
``metasmoothness``. Nothing here imports Ray: a worker builds the tokenized data once
(:func:`load_tokenized`), a model once (:func:`make_model`), then calls :func:`train`
as often as it likes.

Why functional: parameters live in a plain ``dict[str, Tensor]`` and every step is
out-of-place tensor math (``torch.func.functional_call`` for the forward), so autograd
can differentiate the final parameters w.r.t. the per-document ``weights`` (pass
``create_graph=True``), and a run never mutates the ``nn.Module`` it was given.

Public API::

    TokenizedData                       # token id tensors + labels, built once
    make_model(model_cfg, dtype=None) -> (nn.Module, tokenizer)     # CPU, fp32/fp64
    load_tokenized(data_cfg, tokenizer, *, max_length=None) -> TokenizedData
    initial_params(model) -> dict[str, Tensor]
    train(model, data, cfg, weights=None, *, params=None, on_checkpoint=None,
          create_graph=False, deterministic=True, num_threads=None) -> TrainResult
    TrainResult(params, opt_state, log_history, checkpoints)
    doc_losses(model, params, data, batch_size=16) -> Tensor[N]
    batch_order(num_docs, batch_size, num_epochs, seed) -> list[Batch]
    batch_gradient(model, params, data, batch, weights, cfg, create_graph=False)
    checkpoint_steps(num_steps, save_mode, save_interval=0) -> list[int]
    lr_schedule(cfg.lr_schedule, num_steps) -> Callable[[int], float]

Modules: ``data`` (TokenizedData, bergson's batch order), ``losses`` (weighted CE),
``optimizers`` (functional AdamW/SGD/Muon), ``schedules``, ``checkpoints`` (save_mode
schedules), ``loop`` (train, doc_losses), ``model`` (make_model), ``export`` (run-dir
files: optimizer.pt, safetensors checkpoints, HF model dir), ``metasmoothness``.

``weights`` has one entry per document (shape ``[N]``) or per token (``[N, T]``,
``T`` >= the longest document); ``None`` means all ones and gives bit-identical
parameters to ``torch.ones(N)``. A weight multiplies that document's token losses; the
loss denominator (the batch's supervised-token count for ``loss_reduction="mean"``,
each document's own count for ``"sum_of_means"``) does not depend on the weights, so a
weight of 0 removes a document's gradient but keeps its tokens in the denominator
(bergson's semantics).
"""

from __future__ import annotations

from ..config.training import LRScheduleConfig, TrainingConfig, TrainRunConfig
from .checkpoints import checkpoint_steps, next_save_index
from .data import Batch, TokenizedData, batch_order, load_tokenized
from .loop import TrainResult, batch_gradient, doc_losses, initial_params, train
from .model import make_model
from .schedules import lr_schedule

__all__ = [
    "Batch",
    "LRScheduleConfig",
    "TokenizedData",
    "TrainResult",
    "TrainRunConfig",
    "TrainingConfig",
    "batch_gradient",
    "batch_order",
    "checkpoint_steps",
    "doc_losses",
    "initial_params",
    "load_tokenized",
    "lr_schedule",
    "make_model",
    "next_save_index",
    "train",
]
