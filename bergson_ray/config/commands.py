"""One config per command, made of the sections in ``sections.py``.

Each command config's ``__post_init__`` checks what involves two sections at once (the
sections check themselves), so every way of making a config (CLI flags, YAML, Python
keywords, ``dataclasses.replace``) is validated exactly once, before Ray starts.
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
    PreprocessConfig,
    RayConfig,
    RunConfig,
    ScoreConfig,
    require,
)


@dataclass
class BuildConfig:
    """Everything ``bergson-ray build`` (and ``reduce``) needs."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grad: GradientConfig = field(default_factory=GradientConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    drop_columns: bool = False
    """Keep only length/loss in data.hf (bergson's default); we keep the text by default."""
    skip_short_docs: bool = False
    """Keep documents with < 2 tokens as zero rows (bergson's behaviour) instead of failing."""

    def __post_init__(self) -> None:
        require(
            not (self.grad.attribute_tokens and self.preprocess.aggregation != "none"),
            "--attribute_tokens needs --aggregation none",
        )


@dataclass
class ScoreRunConfig(BuildConfig):
    """Everything ``bergson-ray score`` needs: a build's settings plus the query."""

    score: ScoreConfig = field(default_factory=ScoreConfig)


@dataclass
class HessianRunConfig:
    """Everything ``bergson-ray hessian`` needs."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grad: GradientConfig = field(default_factory=GradientConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    hessian: HessianConfig = field(default_factory=HessianConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    skip_short_docs: bool = False
    """Keep documents with < 2 tokens (they contribute nothing) instead of failing."""

    def __post_init__(self) -> None:
        require(
            not self.run.resume,
            "hessian keeps its sums in memory and cannot --resume; rerun it",
        )
        self.hessian.check_against(self.grad)


@dataclass
class EkfacRunConfig:
    """bergson's ``ekfac`` (HessianPipelineConfig) on Ray."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    query: DataConfig = field(default_factory=lambda: DataConfig(dataset=""))
    grad: GradientConfig = field(default_factory=GradientConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    hessian: HessianConfig = field(
        default_factory=lambda: HessianConfig(method="kfac", ev_correction=True)
    )
    query_aggregation: Literal["mean", "sum", "none"] = "mean"
    """How query gradients are combined (none keeps one score column per query)."""
    inversion: Inversion = "damped_inverse"
    """How the Hessian's eigenvalues are inverted for H^-1 q."""
    damping_factor: float = 0.1
    """Damping c in 1 / (lambda + c * mean(lambda))."""
    apply_batch_size: int = 32
    """Query rows preconditioned at once (bounds memory)."""
    query_batch_size: int | None = None
    """Queries per matrix product when scoring (bounds memory; data is still read once)."""
    ray: RayConfig = field(default_factory=RayConfig)
    skip_short_docs: bool = False
    """Keep documents with < 2 tokens as zero rows instead of failing."""

    def __post_init__(self) -> None:
        require(
            self.hessian.factored,
            "ekfac needs a factored --method (kfac, tkfac or shampoo)",
        )
        require(self.damping_factor >= 0, "--damping_factor must be >= 0")
        require(self.apply_batch_size >= 1, "--apply_batch_size must be >= 1")
        require(
            self.query_batch_size is None or self.query_batch_size >= 1,
            "--query_batch_size must be >= 1",
        )


SECTION_HELP: dict[str, str] = {
    "run": "where the run is written",
    "model": "the model",
    "data": "the dataset",
    "query": "the query dataset (flags prefixed --query.)",
    "grad": "gradients and projections",
    "batch": "batching",
    "preprocess": "row preprocessing",
    "ray": "Ray cluster and workers",
    "hessian": "the Hessian fit",
    "score": "scoring",
    "faiss": "the FAISS index",
    "training": "how the model is trained (bergson's trainer options)",
    "probe": "the metasmoothness finite-difference probe",
    "lds": "--method lds: leave-k-out subsets",
    "filter": "--method filter: remove the top proponents or detractors",
    "weight_step": "--method weight_step: retrain with weights 1 - lr * score",
}
"""Argument-group titles of the sections in ``--help``."""
