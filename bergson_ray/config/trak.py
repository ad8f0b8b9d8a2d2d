"""Config of ``trak``: TRAK attribution (Park et al. 2023) as bergson 2.5.1 runs it.

Field names and defaults are bergson's (``TrakConfig`` and the ``TrackstarIndexConfig``
its command uses), so a bergson command line carries over: ``--projection_dim`` defaults
to 16, ``--checkpoints``, ``--stats_sample_size``, ``--loss_batch_size`` and ``--resume``
mean what they mean there, and the Gram inverse is undamped unless ``--damping_factor``
says otherwise. Two differences, both in what a bare command line does:
``--loss_fn`` defaults to ``log_odds`` and ``--projection_target`` to ``global``, the only
values TRAK accepts (bergson defaults to ``ce`` / ``per_module`` and then refuses them).
As in ``trackstar``, the query set's aggregation is ``--aggregation`` (bergson's
``--query.aggregation``) and an existing query store is ``--query_path`` (bergson's
``--path``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sections import (
    BatchConfig,
    DataConfig,
    GradientConfig,
    ModelConfig,
    PreprocessConfig,
    RayConfig,
    RunConfig,
    ScoreConfig,
    require,
)

TRAK_PROJECTION_DIM = 16
"""bergson's ``TrackstarIndexConfig.projection_dim``, which its ``trak`` command uses."""


def _trak_gradients() -> GradientConfig:
    return GradientConfig(
        projection_dim=TRAK_PROJECTION_DIM, loss_fn="log_odds", projection_target="global"
    )


@dataclass
class TrakRunConfig:
    """bergson's ``trak``: log-odds gradients, inverse-Gram query, (1 - p) weights, ensemble."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    query: DataConfig = field(default_factory=lambda: DataConfig(dataset=""))
    grad: GradientConfig = field(default_factory=_trak_gradients)
    batch: BatchConfig = field(default_factory=BatchConfig)
    preprocess: PreprocessConfig = field(
        default_factory=lambda: PreprocessConfig(damping_factor=0.0)
    )
    score: ScoreConfig = field(default_factory=ScoreConfig)
    checkpoints: list[str] = field(default_factory=list)
    """Independently trained checkpoints (same architecture) to ensemble; member i is projected with seed projection_seed + i (empty = --model alone)."""
    stats_sample_size: int | None = None
    """Training rows (the first ones) the Gram is fit on (0 or None = all)."""
    loss_batch_size: int = 32
    """Documents per forward pass when computing each row's label probability p_i (the token budget applies too)."""
    ray: RayConfig = field(default_factory=RayConfig)
    skip_short_docs: bool = False
    """Keep documents with < 2 tokens as zero rows (weight 1, score 0) instead of failing."""

    def __post_init__(self) -> None:
        require(
            self.grad.projection_dim > 0,
            "trak scores randomly projected gradients: --projection_dim must be > 0 "
            f"(its default is {TRAK_PROJECTION_DIM})",
        )
        require(
            self.grad.loss_fn == "log_odds",
            "trak's features are gradients of the negative log-odds: use --loss_fn log_odds",
        )
        require(
            self.grad.projection_target == "global",
            "trak projects the whole gradient with one matrix: use --projection_target global",
        )
        require(
            not self.grad.attribute_tokens,
            "trak weights whole documents by 1 - p_i: drop --attribute_tokens",
        )
        require(
            not self.preprocess.hessian_path,
            "trak fits its own Gram matrix; drop --hessian_path",
        )
        require(
            not self.preprocess.ev_correction,
            "--ev_correction needs an EK-FAC Hessian; trak's Gram is a dense one",
        )
        require(
            not self.ray.fsdp,
            "trak computes each row's label probability on one worker: drop --fsdp",
        )
        require(
            self.stats_sample_size is None or self.stats_sample_size >= 0,
            "--stats_sample_size must be >= 0 (0 = every row)",
        )
        require(self.loss_batch_size >= 1, "--loss_batch_size must be >= 1")
        require(
            all(isinstance(c, str) and c.strip() for c in self.checkpoints),
            "--checkpoints must be a comma-separated list of model paths or hub ids",
        )


__all__ = ["TRAK_PROJECTION_DIM", "TrakRunConfig"]
