"""``GradientCollectorCallback``: a per-example gradient store written while a model trains.

bergson's callback of the same name and options, on our gradient math: the module taps
(``gradients/hooks.py``) see each target module's input ``a`` and output gradient ``g``
during the trainer's own forward and backward pass, and the engine's collector
(``gradients/collector.py``) turns them into the rows ``build`` would write, projected the
same way. The hooks and the rows of each micro-batch live in ``micro_batch_rows.py``; this
module holds the options, the trainer's events and the stores. Three things differ from
reading ``g`` naively:

* **loss scale.** The trainer backpropagates its *reduced* loss (a batch mean, divided by
  accumulation steps, ...), so each row is divided by the factor the trainer put on its
  document's loss, read off the gradient at the logits (``loss_scale.py``). Rows are the
  gradient of the document's own summed loss (``loss_reduction="mean"``: mean), as in
  ``build``, independent of batch composition.
* **normalizers from the first step.** With ``use_optimizer_state`` the rows of step ``t``
  are normalized by the optimizer's bias-corrected second moments *of step t*, read right
  after ``optimizer.step()`` (``optimizer_moments.py``). The taps' ``a``/``g`` of the step's
  micro-batches are kept until then (memory: the tracked modules' activations and output
  gradients for one optimizer step).
* **placement.** Rows go to their dataset index (``_idx``, see ``collator.py``), per rank
  into a shard; rank 0 sums the shards into the store at the epoch's end
  (``train_store.py``), so DDP (also inside Ray Train) writes one store in dataset order.

Layout under ``path``: ``train/epoch_<e>`` per epoch, or one ``train`` store (the sum over
epochs) with ``accumulate_grads``; ``order.hf`` (``_idx``, ``global_step``, ``epoch``) with
``track_order``. Each store is written as ``<name>.part`` and renamed when complete, with a
``config.yaml`` naming the model to make query gradients with (``query_model.py``), so
``serve`` and ``score`` read it like a ``build`` store.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from transformers.trainer_callback import TrainerCallback

from ..config.commands import BuildConfig
from ..config.sections import (
    AttentionConfig,
    DataConfig,
    GradientConfig,
    IndexModelConfig,
    RunConfig,
)
from ..errors import BadInputError
from ..gradients.modules import find_target_modules
from ..gradients.normalizers import Normalizer
from ..store.elements import element_type
from ..store.processor import ProcessorConfig
from . import dist
from .collator import PREPARED_FLAG
from .micro_batch_rows import MicroBatchRows
from .optimizer_moments import live_normalizers
from .query_model import query_model_config
from .train_store import RowShard, SumBuffer, commit_store, part_of, remove, save_order

log = logging.getLogger(__name__)

def _gradient_config(
    projection_dim: int,
    include_bias: bool,
    attention_cfgs: dict[str, AttentionConfig] | None,
    modules: list[str] | None,
    filter_modules: str | None,
    loss_reduction: str,
    projection_type: str,
) -> GradientConfig:
    attention_cfgs = dict(attention_cfgs or {})
    attention = AttentionConfig()
    if attention_cfgs:
        kinds = {(c.num_heads, c.head_size, c.head_dim) for c in attention_cfgs.values()}
        if len(kinds) > 1:
            raise BadInputError("every module in attention_cfgs must use the same head layout")
        attention = next(iter(attention_cfgs.values()))
    if loss_reduction not in ("sum", "mean"):
        raise BadInputError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
    return GradientConfig(
        projection_dim=projection_dim or 0,
        projection_type=projection_type,  # type: ignore[arg-type]
        include_bias=include_bias,
        split_attention_modules=list(attention_cfgs),
        attention=attention,
        modules=list(modules or []),
        filter_modules=filter_modules,
        loss_reduction=loss_reduction,  # type: ignore[arg-type]
    )


class GradientCollectorCallback(TrainerCallback):
    """Write a per-example gradient store while an HF ``Trainer`` trains.

    Call :func:`~bergson_ray.integrations.collator.prepare_for_gradient_collection` on the
    trainer first (it threads dataset indices through the collator).

    Args (bergson's, same defaults):
        path: directory the stores go under (``train/epoch_<e>``, ``train``, ``order.hf``).
        attention_cfgs: module name -> :class:`AttentionConfig` for modules whose output
            dimension is split into per-head blocks.
        projection_dim: per-module projection size ``p`` (rows of ``p x p`` per module;
            0 = full gradients).
        include_bias: also attribute to the biases of the tracked modules.
        dtype: element type of ``gradients.bin`` (numpy/torch dtype or name).
        accumulate_grads: one store holding each example's sum over epochs instead of
            one store per epoch.
        use_optimizer_state: normalize rows by the optimizer's bias-corrected second
            moments of the step they were trained in (Adam or Adafactor).
        scale_by_lr: also multiply by that step's learning rate, so a row is the update
            the optimizer applied for the example (``lr * g / sqrt(v)``).
        track_order: write ``order.hf`` with (``_idx``, ``global_step``, ``epoch``).

    Ours (keyword-only): ``modules`` / ``filter_modules`` (include / exclude globs, as on
    ``build``), ``loss_reduction`` (``sum`` as ``build``'s default, or ``mean``),
    ``projection_type``, ``overwrite`` (replace stores this run would write), and what
    each store's ``config.yaml`` records for the query side (``serve``, ``score``):
    ``model_name_or_path`` (the model query gradients are made with; default: where the
    trainer's model was loaded from, else the trainer's ``output_dir``) and ``dataset``
    (the training data as ``build --dataset`` names it, so hits come with their text;
    default: none).
    """

    def __init__(
        self,
        path: str | Path,
        attention_cfgs: dict[str, AttentionConfig] | None = None,
        projection_dim: int = 16,
        include_bias: bool = False,
        dtype: Any = np.float16,
        accumulate_grads: bool = False,
        use_optimizer_state: bool = True,
        scale_by_lr: bool = True,
        track_order: bool = False,
        *,
        modules: list[str] | None = None,
        filter_modules: str | None = None,
        loss_reduction: str = "sum",
        projection_type: str = "rademacher",
        overwrite: bool = False,
        model_name_or_path: str | None = None,
        dataset: str = "",
    ):
        super().__init__()
        self.path = Path(path)
        self.grad_cfg = _gradient_config(
            projection_dim, include_bias, attention_cfgs, modules, filter_modules,
            loss_reduction, projection_type,
        )
        if isinstance(dtype, type) and issubclass(dtype, np.generic):
            dtype = np.dtype(dtype)
        self.dtype = element_type(dtype).torch_dtype
        self.accumulate_grads = accumulate_grads
        self.use_optimizer_state = use_optimizer_state
        self.scale_by_lr = scale_by_lr
        self.track_order = track_order
        self.overwrite = overwrite
        self.model_name_or_path = model_name_or_path
        self.dataset = dataset
        self.order: list[dict[str, int]] | None = [] if track_order else None
        self.last_normalizers: dict[str, Normalizer] = {}
        """Normalizers applied to the latest step's rows (saved with each store)."""

        self._rows: MicroBatchRows | None = None
        self._model: nn.Module | None = None
        self._num_items = 0
        self._dim = 0
        self._epoch = 0
        self._shard: RowShard | None = None
        self._accum: SumBuffer | None = None
        self._model_cfg: IndexModelConfig | None = None

    # ------------------------------------------------------------------ layout
    @property
    def _deferred(self) -> bool:
        """Rows wait for the optimizer step (they need its moments)."""
        return self.use_optimizer_state

    def _epoch_final(self, epoch: int) -> Path:
        return self.path / "train" / f"epoch_{epoch}"

    def _shard_dir(self, epoch: int) -> Path:
        if self.accumulate_grads:
            return part_of(self.path / "train") / f"epoch_{epoch}.shards"
        return part_of(self._epoch_final(epoch))

    def _processor(self) -> ProcessorConfig:
        return ProcessorConfig.from_gradient_config(self.grad_cfg)

    def _record(self, final: Path) -> BuildConfig | None:
        """What ``config.yaml`` of the store at ``final`` says: the model to make query
        gradients with, and this collector's gradient settings. No optimizer state:
        queries are plain gradients, so a score is ``<query gradient, update of the
        example>``."""
        if self._model_cfg is None:
            return None
        return BuildConfig(
            run=RunConfig(run_path=str(final.resolve())),
            model=self._model_cfg,
            data=DataConfig(dataset=self.dataset),
            grad=self.grad_cfg,
        )

    # ------------------------------------------------------------------ trainer events
    def on_train_begin(self, args, state, control, *, model=None, train_dataloader=None, **kwargs):
        if not getattr(args, PREPARED_FLAG, False):
            raise BadInputError(
                "call bergson_ray.prepare_for_gradient_collection(trainer) before trainer.train() "
                "so rows can be placed at their dataset index"
            )
        if getattr(args, "gradient_checkpointing", False):
            raise BadInputError(
                "gradient collection does not support gradient_checkpointing (the recomputed "
                "forward pass would be collected twice); turn it off"
            )
        if getattr(args, "label_smoothing_factor", 0.0):
            raise BadInputError(
                "gradient collection needs the plain cross-entropy loss; set label_smoothing_factor=0"
            )
        if model is None:
            raise BadInputError("the trainer passed no model to the callback")
        self.close()  # hooks left on the model by an earlier, interrupted train()
        self.order = [] if self.track_order else None
        self._accum = None
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise BadInputError("gradient collection needs a train dataset with a length")
        self._num_items = len(dataset)
        self._model = model
        modules = find_target_modules(model, self.grad_cfg)
        self._rows = MicroBatchRows(model, modules, self.grad_cfg, deferred=self._deferred)
        self._dim = self._rows.dim
        self._epoch = int(state.epoch or 0)
        self._model_cfg = query_model_config(
            model, kwargs.get("processing_class") or kwargs.get("tokenizer"),
            args.output_dir, self.model_name_or_path,
        )
        self._prepare_outputs(resumed=state.global_step > 0)
        self._rows.attach()
        log.info(
            "collecting gradients of %d modules (%d columns) for %d examples into %s",
            len(modules), self._dim, self._num_items, self.path,
        )

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch = int(state.epoch or 0)
        self._shard = RowShard(self._shard_dir(self._epoch), dist.rank(), self._dim)

    def on_substep_end(self, args, state, control, **kwargs):
        if self._rows is not None:
            self._rows.close_live_batch()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._rows is not None:
            self._rows.close_live_batch()

    def on_optimizer_step(self, args, state, control, *, model=None, optimizer=None, **kwargs):
        """Right after ``optimizer.step()``: its moments are the ones of this step, and the
        scheduler has not moved the learning rate yet."""
        self._finish_step(model, optimizer, global_step=state.global_step + 1)

    def on_step_end(self, args, state, control, *, model=None, optimizer=None, **kwargs):
        # on_optimizer_step normally emptied the queue; a trainer without that event
        # (older transformers) lands here, with the moments still this step's.
        if self._rows is not None and self._rows.pending:
            self._finish_step(model, optimizer, global_step=state.global_step)

    def _finish_step(self, model: nn.Module | None, optimizer: Any, global_step: int) -> None:
        """The step's rows into this rank's shard (and ``order.hf``'s records)."""
        if self._rows is None:  # no train() began: nothing is hooked
            return
        normalizers = None
        if self._deferred and self._rows.pending:
            if optimizer is None:
                raise BadInputError("use_optimizer_state needs the trainer's optimizer")
            self.last_normalizers = normalizers = live_normalizers(
                optimizer, model or self._model, self._rows.modules,
                include_bias=self.grad_cfg.include_bias, scale_by_lr=self.scale_by_lr,
            )
        idx, rows = self._rows.take_step(normalizers)
        if not len(idx):
            return
        if self._shard is None:
            raise RuntimeError("a training step ran outside an epoch")
        self._shard.append(idx, rows)
        if self.order is not None:
            self.order.extend(
                {"_idx": int(i), "global_step": int(global_step), "epoch": self._epoch}
                for i in idx.tolist()
            )

    def on_epoch_end(self, args, state, control, **kwargs):
        if self._shard is None:
            return
        self._shard.close()
        self._shard = None
        dist.barrier()  # every rank's shard is on disk
        if dist.rank() == 0:
            shards = self._shard_dir(self._epoch)
            if self.accumulate_grads:
                if self._accum is None:
                    self._accum = SumBuffer(part_of(self.path / "train"), self._num_items, self._dim)
                self._accum.add_shards(shards)
                self._accum.flush()
                remove(shards)
            else:
                buffer = SumBuffer(shards, self._num_items, self._dim)
                buffer.add_shards(shards)
                final = self._epoch_final(self._epoch)
                commit_store(
                    shards, final, buffer,
                    grad_sizes=self._rows.grad_sizes, dtype=self.dtype,
                    processor=self._processor(), normalizers=self.last_normalizers,
                    record=self._record(final),
                )
        dist.barrier()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
        if self.accumulate_grads and dist.rank() == 0 and self._accum is not None:
            final = self.path / "train"
            commit_store(
                part_of(final), final, self._accum,
                grad_sizes=self._rows.grad_sizes, dtype=self.dtype,
                processor=self._processor(), normalizers=self.last_normalizers,
                record=self._record(final),
            )
            self._accum = None
        if self.order is not None:
            records = [r for part in dist.gather_to_all(self.order) for r in part]
            if dist.rank() == 0:
                records.sort(key=lambda r: r["global_step"])  # stable: rank order within a step
                save_order(self.path, records)
        dist.barrier()

    def close(self) -> None:
        """Remove every hook from the model (training is over, or abandoned)."""
        if self._rows is not None:
            self._rows.detach()

    # ------------------------------------------------------------------ outputs
    def _prepare_outputs(self, resumed: bool) -> None:
        """Rank 0 refuses to replace finished stores (unless ``overwrite``) and clears stale
        ``.part`` directories; every rank gets the verdict, so none hangs in a barrier."""
        problem = None
        if dist.rank() == 0:
            if self.accumulate_grads:
                targets = [self.path / "train"]
                if resumed:
                    log.warning(
                        "training resumes at step > 0: the summed store covers only the steps "
                        "trained from here on"
                    )
            else:
                train = self.path / "train"
                if train.is_dir() and (train / "info.json").exists():
                    targets = [train]
                else:
                    targets = [
                        p for p in train.glob("epoch_*")
                        if not p.name.endswith(".part")
                        and p.name.removeprefix("epoch_").isdigit()
                        and int(p.name.removeprefix("epoch_")) >= self._epoch
                    ]
            existing = [t for t in targets if t.exists()]
            if existing and not self.overwrite:
                problem = (
                    f"{existing[0]} already holds a gradient store; pass overwrite=True to "
                    "GradientCollectorCallback to replace it"
                )
            else:
                for t in existing:
                    remove(t)
                for stale in [part_of(self.path / "train"), *self.path.glob("train/epoch_*.part")]:
                    remove(stale)
                self.path.mkdir(parents=True, exist_ok=True)
        problems = [p for p in dist.gather_to_all(problem) if p]
        if problems:
            raise BadInputError(problems[0])
