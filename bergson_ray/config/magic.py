"""Options of ``bergson-ray magic``: exact metagradients through training (MAGIC).

Names and defaults are bergson 2.5.1's ``bergson magic`` flags (``--aggregation``,
``--attribute_tokens``, ``--double_backward_batch_size``, ``--backward_save_every``,
``--cleanup_ckpts``, ``--skip_validation``); the training flags are ``train``'s and the
validation flags ``validate``'s, so ``--skip_validation false`` runs the LDS on the same
model, data and training recipe. The string under each field is its ``--help`` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .sections import DataConfig, ModelConfig, RayConfig, RunConfig, require
from .training import TrainingConfig
from .validation import FilterConfig, LdsConfig, Method, WeightStepConfig

REPLAYABLE = ("all", "sqrt", "log")
"""Checkpoint schedules the reverse pass can replay (each keeps the state before T-1)."""


@dataclass
class MagicConfig:
    """What to differentiate and how the reverse pass is run."""

    aggregation: Literal["none", "mean", "sum"] = "none"
    """none: one score column per query document; mean: pooled token-mean query loss; sum: summed."""
    attribute_tokens: bool = False
    """One weight, and one score, per training token instead of per document."""
    per_token: bool = False
    """Deprecated alias of --attribute_tokens (bergson's old name)."""
    double_backward_batch_size: int | None = None
    """Most rows in one double-backward graph (splits micro-batches; None = whole micro-batches)."""
    backward_save_every: int = 0
    """Save a query's reverse-pass state every N updates so --resume continues it (0 = never)."""
    cleanup_ckpts: bool = True
    """Delete the saved training states once every score column is written."""
    skip_validation: bool = True
    """Skip the leave-k-out validation (false: run --method on the scores in the same job)."""

    def __post_init__(self) -> None:
        require(
            self.aggregation in ("none", "mean", "sum"), "--aggregation must be none, mean or sum"
        )
        require(
            self.double_backward_batch_size is None or self.double_backward_batch_size >= 1,
            "--double_backward_batch_size must be >= 1",
        )
        require(self.backward_save_every >= 0, "--backward_save_every must be >= 0")
        if self.per_token:
            self.attribute_tokens = True


@dataclass
class MagicRunConfig:
    """Everything ``bergson-ray magic`` needs: the run, the recipe, the query, validation."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    query: DataConfig = field(default_factory=lambda: DataConfig(dataset=""))
    """The query set (flags --query.*); an empty --query.dataset means the training data."""
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(save_optimizer_state="none")
    )
    magic: MagicConfig = field(default_factory=MagicConfig)
    method: Method = "lds"
    """Validation method with --skip_validation false: lds, filter or weight_step."""
    lds: LdsConfig = field(default_factory=LdsConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    weight_step: WeightStepConfig = field(default_factory=WeightStepConfig)
    subset_weight: float = 0.0
    """Training weight of a subset's documents in a validation retrain (0 = leave them out)."""
    exclude_zero_scores: bool = False
    """Leave documents whose scores are all zero out of every validation subset."""
    save_models: bool = False
    """Save the trained model (weights + tokenizer) to RUN/retrained/base, as bergson."""
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        tc, mc = self.training, self.magic
        require(
            tc.save_mode in REPLAYABLE,
            f"--save_mode {tc.save_mode} keeps no state before the last update, so it cannot be "
            f"replayed; use one of {', '.join(REPLAYABLE)}",
        )
        require(
            self.model.precision in ("fp32", "fp64", "auto"),
            "magic runs on CPU in fp32 or fp64; pass --precision fp32 or fp64",
        )
        require(
            not (tc.train_mode and mc.double_backward_batch_size),
            "--double_backward_batch_size cannot be used with --train_mode: dropout masks depend "
            "on the micro-batch shape, so a further split would replay different masks",
        )
        require(
            not (mc.attribute_tokens and not mc.skip_validation),
            "validation needs one score per document; pass --skip_validation true with "
            "--attribute_tokens",
        )

    def query_data(self) -> DataConfig:
        """The query set: --query.*, or the training data as bergson defaults it."""
        return self.query if self.query.dataset else self.data
