"""Training options of ``bergson-ray train`` (and of validate / magic / metasmoothness).

Names and defaults are bergson 2.5.1's ``TrainingConfig`` / ``LRScheduleConfig`` so a
``bergson train`` command line translates flag for flag (``--lr``, ``--adam_beta1``,
``--save_mode`` ...). The string under each field is its ``--help`` line.
``__post_init__`` rejects values no run could use, with one sentence naming the flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from .sections import DataConfig, ModelConfig, RunConfig, require

SaveMode = Literal["all", "sqrt", "log", "interval", "final"]
ScheduleType = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]
OPTIMIZERS = ("adamw", "muon", "sgd")
SAVE_MODES = ("all", "sqrt", "log", "interval", "final")
SCHEDULES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass
class LRScheduleConfig:
    """Learning-rate schedule (bergson's ``LRScheduleConfig``; HF scheduler names)."""

    lr: float = 1e-5
    """Peak learning rate."""
    lr_scheduler_type: ScheduleType = "linear"
    """Schedule after warmup: linear, cosine, cosine_with_restarts, polynomial, constant(_with_warmup)."""
    lr_start: float = 0.0
    """Learning rate at the start of warmup (warmup is linear from here to --lr)."""
    lr_end: float = 0.0
    """Final learning rate of the polynomial schedule."""
    warmup_steps: float = 0
    """Warmup length: >= 1 is a step count, in [0, 1) a fraction of the training steps."""
    num_cycles: float = 0.5
    """Cosine cycles (cosine, cosine_with_restarts); 0.5 is one half-cosine decay."""
    power: float = 1.0
    """Exponent of the polynomial decay."""

    def __post_init__(self) -> None:
        require(_finite(self.lr) and self.lr >= 0, "--lr must be a finite number >= 0")
        require(
            self.lr_scheduler_type in SCHEDULES,
            f"--lr_scheduler_type must be one of {', '.join(SCHEDULES)}",
        )
        require(_finite(self.lr_start) and self.lr_start >= 0, "--lr_start must be >= 0")
        require(_finite(self.lr_end) and self.lr_end >= 0, "--lr_end must be >= 0")
        require(
            _finite(self.warmup_steps) and self.warmup_steps >= 0,
            "--warmup_steps must be >= 0 (a step count, or a fraction below 1)",
        )
        require(_finite(self.num_cycles) and self.num_cycles >= 0, "--num_cycles must be >= 0")
        require(_finite(self.power) and self.power > 0, "--power must be > 0")


@dataclass
class TrainingConfig:
    """How to train: bergson 2.5.1's trainer options, with its defaults."""

    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    batch_size: int = 16
    """Documents per optimizer step (the last batch is padded with weight-0 copies)."""
    num_epochs: int = 1
    """Passes over the training data, each shuffled with seed + epoch."""
    seed: int = 42
    """Seed of the per-epoch shuffle (and of torch's RNG for dropout in --train_mode)."""
    optimizer: Literal["adamw", "muon", "sgd"] = "adamw"
    """adamw, muon (Newton-Schulz on 2-D params, AdamW on the rest) or sgd (with momentum)."""
    adam_beta1: float = 0.95
    """AdamW beta1; also the momentum of sgd and muon."""
    adam_beta2: float = 0.975
    """AdamW beta2 (muon's 1-D params too)."""
    eps_root: float = 1e-17
    """Epsilon inside AdamW's square root (keeps the update differentiable at zero)."""
    adam_eps: float = 1e-8
    """Epsilon outside AdamW's square root (muon's 1-D params always use 1e-8, as bergson)."""
    weight_decay: float = 0.01
    """Weight decay: decoupled for adamw/muon, added to the gradient for sgd."""
    loss_reduction: Literal["mean", "sum_of_means"] = "mean"
    """mean: over all supervised tokens of the batch; sum_of_means: per-document means, summed."""
    max_grad_norm: float | None = None
    """Clip the gradient to this global norm before each step (None or 0 = no clipping)."""
    grad_accum_steps: int = 1
    """Micro-batches per batch; their gradients are summed into the full-batch gradient."""
    train_mode: bool = False
    """Run the model in .train() mode (dropout on); the default is eval mode, as bergson."""
    save_mode: SaveMode = "sqrt"
    """Checkpoints to keep: all, sqrt, log, interval or final (bergson's schedules)."""
    save_interval: int = 0
    """Steps between checkpoints for --save_mode interval."""
    save_optimizer_state: Literal["none", "last", "all"] = "last"
    """Write AdamW second moments: none, last (RUN/optimizer.pt) or all (every checkpoint too)."""
    torch_threads: int = 0
    """torch intra-op threads while training (0 = leave torch's setting alone)."""
    deterministic: bool = True
    """Use deterministic torch algorithms, so the same config gives bit-identical parameters."""

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "--batch_size must be >= 1")
        require(self.num_epochs >= 1, "--num_epochs must be >= 1")
        require(
            self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"
        )
        require(
            _finite(self.adam_beta1) and 0 <= self.adam_beta1 < 1, "--adam_beta1 must be in [0, 1)"
        )
        require(
            _finite(self.adam_beta2) and 0 <= self.adam_beta2 < 1, "--adam_beta2 must be in [0, 1)"
        )
        require(
            not (self.optimizer == "muon" and self.adam_beta1 <= 0),
            "--optimizer muon needs --adam_beta1 (its momentum) > 0",
        )
        require(_finite(self.eps_root) and self.eps_root >= 0, "--eps_root must be >= 0")
        require(_finite(self.adam_eps) and self.adam_eps >= 0, "--adam_eps must be >= 0")
        require(
            _finite(self.weight_decay) and self.weight_decay >= 0, "--weight_decay must be >= 0"
        )
        require(
            self.loss_reduction in ("mean", "sum_of_means"),
            "--loss_reduction must be mean or sum_of_means",
        )
        require(
            self.max_grad_norm is None
            or (_finite(self.max_grad_norm) and self.max_grad_norm >= 0),
            "--max_grad_norm must be >= 0 (0 or unset disables clipping)",
        )
        require(self.grad_accum_steps >= 1, "--grad_accum_steps must be >= 1")
        require(
            self.save_mode in SAVE_MODES, f"--save_mode must be one of {', '.join(SAVE_MODES)}"
        )
        require(self.save_interval >= 0, "--save_interval must be >= 0")
        require(
            self.save_mode != "interval" or self.save_interval > 0,
            "--save_mode interval needs --save_interval > 0",
        )
        require(
            self.save_optimizer_state in ("none", "last", "all"),
            "--save_optimizer_state must be none, last or all",
        )
        require(self.torch_threads >= 0, "--torch_threads must be >= 0 (0 = torch's default)")


@dataclass
class TrainRunConfig:
    """Everything ``bergson-ray train`` needs: where to write, what to train on, how."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    save_models: bool = True
    """Save the trained model (weights + tokenizer) to RUN/model (bergson's default is false)."""

    def __post_init__(self) -> None:
        require(not self.run.resume, "train cannot --resume; rerun it (it is deterministic)")
        require(
            self.model.precision in ("fp32", "fp64", "auto"),
            "train runs on CPU in fp32 or fp64; pass --precision fp32 or fp64",
        )


@dataclass
class MetasmoothnessSettings:
    """The finite-difference probe of ``metasmoothness`` (arXiv 2503.13751, Def. 2)."""

    fd_step: float = 0.1
    """Finite-difference step h: the three runs use weights 1, 1 + h v and 1 + 2h v."""
    direction_seed: int = 0
    """Seed of the random direction v ~ N(0, I) over the training documents."""

    def __post_init__(self) -> None:
        require(_finite(self.fd_step) and self.fd_step > 0, "--fd_step must be > 0")


@dataclass
class MetasmoothnessRunConfig(TrainRunConfig):
    """Everything ``bergson-ray metasmoothness`` needs: a training run plus the probe."""

    probe: MetasmoothnessSettings = field(default_factory=MetasmoothnessSettings)
    save_models: bool = False
    """Save the model trained with weights 1 to RUN/model (bergson's default: false)."""
