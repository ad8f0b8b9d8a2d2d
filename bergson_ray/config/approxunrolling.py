"""Config of ``approxunrolling``: SOURCE (Bae et al. 2024), bergson 2.5.1's approximate
unrolling, on Ray.

Option names and defaults are bergson's ``ApproxUnrollingConfig`` (``--checkpoints``,
``--segments 3``, ``--lr_list``, ``--step_size_list``, ``--momentum``,
``--use_adam_preconditioner``, ``--inversion``, ``--damping_factor``,
``--apply_batch_size 2``, ``--query_batch_size``) plus its ``HessianConfig`` (``--method``,
``--ev_correction``, which bergson asserts is on, so here it defaults to on) and the query
set's ``--aggregation`` (default ``none``: one score column per query). bergson's
``--path`` (an existing query index) is ``--query_path``, as in our other commands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .hessian import HessianConfig
from .sections import (
    BatchConfig,
    DataConfig,
    GradientConfig,
    Inversion,
    ModelConfig,
    RayConfig,
    RunConfig,
    require,
)


def _numbers(values: list, flag: str, whole: bool = False) -> list:
    """List flags arrive as text (``--lr_list 1e-3,5e-4``); convert with one clear error."""
    out: list = []
    for v in values:
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = float("nan")
        ok = x == x and (not whole or x == int(x))
        what = "whole step counts" if whole else "numbers"
        require(ok, f"{flag} expects {what} separated by commas, got {v!r}")
        out.append(int(x) if whole else x)
    return out


@dataclass
class ApproxUnrollingRunConfig:
    """bergson's ``approxunrolling``: per-checkpoint EK-FAC fits, segment averages, the query
    walked back through training, per-segment scores summed."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    query: DataConfig = field(default_factory=lambda: DataConfig(dataset=""))
    grad: GradientConfig = field(default_factory=GradientConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    hessian: HessianConfig = field(
        default_factory=lambda: HessianConfig(method="kfac", ev_correction=True)
    )
    checkpoints: list[str] = field(default_factory=list)
    """Training checkpoints in training order: HF model dirs, `bergson-ray train`'s RUN/checkpoints/step_<N>.ckpt, or a training RUN dir (= all its step_<N>.ckpt with N > 0)."""
    model_path: str | None = None
    """Base model of step_<N>.ckpt checkpoints (default: the training run's --model, else --model)."""
    segments: int = 3
    """Segments L the trajectory is split into; must divide the number of checkpoints."""
    lr: float = 1e-5
    """Kept for bergson compatibility; the learning rates come from --lr_list or the run's log_history.json."""
    lr_list: list[float] = field(default_factory=list)
    """Per-segment mean learning rate (one per segment, with --step_size_list); empty = from log_history.json."""
    step_size_list: list[int] = field(default_factory=list)
    """Per-segment optimizer step count (one per segment, with --lr_list); empty = from checkpoint names."""
    momentum: float | None = None
    """SGD heavy-ball beta: lr x steps is scaled by 1/(1-beta); unset = the training run's (sgd: --adam_beta1), else 0."""
    use_adam_preconditioner: bool = False
    """Adam/AdamW variant (Bae et al. App. C): diagonal preconditioner from each checkpoint's second moments."""
    inversion: Inversion = "damped_inverse"
    """Eigenvalue inversion of the Adam variant's EK-FAC inverse (the SGD variant inverts nothing)."""
    damping_factor: float = 0.1
    """Damping c of the Adam variant's inverse: 1 / (lambda + c * mean(lambda))."""
    apply_batch_size: int = 2
    """Query rows transformed at a time (bounds memory of the query walk)."""
    aggregation: Literal["none", "mean", "sum"] = "none"
    """How query gradients combine: one score column per query (none) or one mean/sum query."""
    query_path: str = ""
    """Existing full-gradient query store to use instead of building one (bergson's --path)."""
    query_batch_size: int | None = None
    """Queries per matrix product when scoring (bounds memory; data is still read once)."""
    ray: RayConfig = field(default_factory=RayConfig)
    skip_short_docs: bool = False
    """Keep documents with < 2 tokens as zero rows instead of failing."""

    def __post_init__(self) -> None:
        self.lr_list = _numbers(list(self.lr_list), "--lr_list")
        self.step_size_list = _numbers(list(self.step_size_list), "--step_size_list", whole=True)
        require(self.segments >= 1, f"--segments must be >= 1, got {self.segments}")
        require(
            bool(self.lr_list) == bool(self.step_size_list),
            "--lr_list and --step_size_list go together: give both (one value per segment) "
            "or neither (both are read from the training run)",
        )
        for flag, values in (("--lr_list", self.lr_list), ("--step_size_list", self.step_size_list)):
            require(
                not values or len(values) == self.segments,
                f"{flag} has {len(values)} values but --segments is {self.segments}; give one per segment",
            )
        require(all(v >= 0 for v in self.lr_list), "--lr_list values must be >= 0")
        require(all(v >= 0 for v in self.step_size_list), "--step_size_list values must be >= 0")
        require(
            self.momentum is None or 0.0 <= self.momentum < 1.0,
            f"--momentum must be in [0, 1), got {self.momentum}",
        )
        require(
            self.hessian.factored,
            "approxunrolling fits Kronecker factors at each checkpoint: --method must be kfac, "
            "tkfac or shampoo",
        )
        require(
            self.hessian.ev_correction,
            "approxunrolling needs the EK-FAC eigenvalues (as bergson asserts): keep "
            "--ev_correction true",
        )
        require(
            self.grad.projection_dim == 0,
            "approxunrolling scores full gradients (EK-FAC cannot be projected): set --projection_dim 0",
        )
        require(
            not self.grad.attribute_tokens,
            "approxunrolling scores whole documents here: drop --attribute_tokens",
        )
        require(
            not self.grad.optimizer_state,
            "approxunrolling reads each checkpoint's own optimizer state: drop --optimizer_state "
            "and pass --use_adam_preconditioner for Adam-trained runs",
        )
        require(
            not (self.use_adam_preconditioner and self.inversion == "factored_tikhonov"),
            "--inversion factored_tikhonov cannot invert the EK-FAC eigenvalues of the Adam "
            "variant; pick damped_inverse, tikhonov_filtered or pseudoinverse",
        )
        require(self.grad.loss_fn == "ce", "approxunrolling supports --loss_fn ce only (as hessian)")
        require(
            not self.ray.fsdp,
            "approxunrolling loads a whole model per worker: drop --fsdp",
        )
        require(self.damping_factor >= 0, "--damping_factor must be >= 0")
        require(self.apply_batch_size >= 1, "--apply_batch_size must be >= 1")
        require(
            self.query_batch_size is None or self.query_batch_size >= 1,
            "--query_batch_size must be >= 1",
        )
        require(
            not (self.run.resume and self.run.overwrite),
            "--resume reuses finished work and --overwrite discards it: pass one of them",
        )
        self.hessian.check_against(self.grad)


__all__ = ["ApproxUnrollingRunConfig"]
