"""Config of ``lissa``: LiSSA influence with the damped Gauss-Newton Hessian.

Names and defaults are bergson 2.5.1's (``LissaConfig`` and the ``index_cfg`` /
``score_cfg`` sections of its ``lissa`` command): ``--damping``, ``--scale``, ``--depth``,
``--repeats``, ``--micro_batch_size``, ``--seed`` as there; bergson's
``--lissa_cfg.batch_size`` is ``--batch_size`` (no other section has one here); the query
set's aggregation, bergson's ``--query.aggregation``, is ``--query_aggregation`` (as in
``ekfac``); an existing query store, bergson's ``--path``, is ``--query_path``; bergson's
``--resume`` is ``--resume``. The string under each field is its ``--help`` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .sections import (
    BatchConfig,
    DataConfig,
    GradientConfig,
    ModelConfig,
    RayConfig,
    RunConfig,
    ScoreConfig,
    require,
)


@dataclass
class LissaConfig:
    """The truncated series sum_t (I - (G + damping I) / scale)^t q / scale, averaged over repeats."""

    damping: float = 0.01
    """Added to every eigenvalue of the Gauss-Newton Hessian G."""
    scale: float = 100.0
    """Divides the damped Hessian; the series converges only when it exceeds half the damped Hessian's largest eigenvalue."""
    depth: int = 5000
    """Terms of the series (one Hessian-vector product on a fresh batch each)."""
    repeats: int = 5
    """Independent estimates averaged per query (each one a job for a worker)."""
    batch_size: int = 16
    """Training documents per Hessian-vector product."""
    micro_batch_size: int = 16
    """Documents per forward pass within a batch; lower it to save memory."""
    seed: int = 0
    """Seeds the training batches, drawn separately for each query (bergson's draws)."""

    def __post_init__(self) -> None:
        require(self.damping >= 0, "--damping must be >= 0")
        require(self.scale > 0, "--scale must be > 0")
        require(self.depth >= 1, "--depth must be >= 1")
        require(self.repeats >= 1, "--repeats must be >= 1")
        require(self.batch_size >= 1, "--batch_size must be >= 1")
        require(self.micro_batch_size >= 1, "--micro_batch_size must be >= 1")
        require(self.seed >= 0, "--seed must be >= 0")


@dataclass
class LissaRunConfig:
    """bergson's ``lissa``: query gradients, LiSSA inverse-Hessian-vector products, scores."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    query: DataConfig = field(default_factory=lambda: DataConfig(dataset=""))
    query_aggregation: Literal["none", "mean", "sum"] = "none"
    """How the query gradients are combined: one score column per query (none) or one (mean, sum)."""
    grad: GradientConfig = field(default_factory=GradientConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    lissa: LissaConfig = field(default_factory=LissaConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    skip_short_docs: bool = False
    """Keep documents with < 2 tokens as zero rows instead of failing."""

    def __post_init__(self) -> None:
        require(
            self.grad.projection_dim == 0,
            "lissa works on full gradients (the Gauss-Newton products are in weight space): "
            "pass --projection_dim 0",
        )
        require(
            not self.grad.split_attention_modules,
            "lissa does not split attention heads; drop --split_attention_modules",
        )
        require(
            not self.ray.fsdp,
            "lissa's workers each hold the whole model (its Hessian-vector products need every "
            "tracked weight); drop --fsdp",
        )


__all__ = ["LissaConfig", "LissaRunConfig"]
