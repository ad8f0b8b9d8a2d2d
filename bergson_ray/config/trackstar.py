"""Configs of ``trackstar`` (the whole TrackStar pipeline) and ``mix`` (its mixing step).

Field names and defaults are bergson 2.5.1's (``TrackstarConfig``, ``TrackstarIndexConfig``,
``MixConfig``), so a bergson command line carries over: ``--projection_dim`` defaults to
16 because TrackStar scores compressed gradients, ``--target_downweight_components``,
``--mix_hessians``, ``--stats_sample_size`` and ``--resume`` mean what they mean there.
The query set's aggregation is ``--aggregation`` (bergson's ``--query.aggregation``, which
bergson copies into the preprocess section anyway); an existing query store is
``--query_path`` (bergson's ``--path``).
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

TRACKSTAR_PROJECTION_DIM = 16
"""bergson's ``TrackstarIndexConfig.projection_dim``: 16 x 16 = 256 values per module."""


@dataclass
class TrackstarRunConfig:
    """bergson's ``trackstar``: value and query Hessians, their mix, H^-1 query, scores."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    query: DataConfig = field(default_factory=lambda: DataConfig(dataset=""))
    grad: GradientConfig = field(
        default_factory=lambda: GradientConfig(projection_dim=TRACKSTAR_PROJECTION_DIM)
    )
    batch: BatchConfig = field(default_factory=BatchConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    target_downweight_components: int = 1000
    """Component k where the sorted eigenvalue curves of the two weighted Hessians cross (sets the mixing weight)."""
    mix_hessians: bool = True
    """Mix the query Hessian into the value Hessian; false preconditions with the value Hessian alone."""
    stats_sample_size: int | None = 10_000
    """Rows of each split (the first ones) the two Hessians are fit on (0 or None = all)."""
    ray: RayConfig = field(default_factory=RayConfig)
    skip_short_docs: bool = False
    """Keep documents with < 2 tokens as zero rows instead of failing."""

    def __post_init__(self) -> None:
        require(
            self.grad.projection_dim > 0,
            "trackstar scores randomly projected gradients: --projection_dim must be > 0 "
            f"(its default is {TRACKSTAR_PROJECTION_DIM})",
        )
        require(
            self.grad.projection_target == "per_module",
            "trackstar needs --projection_target per_module (the autocorrelation Hessian is per module)",
        )
        require(
            not self.preprocess.hessian_path,
            "trackstar fits its own Hessian; drop --hessian_path (use build and score to "
            "precondition with an existing one)",
        )
        require(
            not self.preprocess.ev_correction,
            "--ev_correction needs an EK-FAC Hessian; trackstar's is a dense autocorrelation one",
        )
        require(
            self.stats_sample_size is None or self.stats_sample_size >= 0,
            "--stats_sample_size must be >= 0 (0 = every row)",
        )
        require(
            not (self.grad.attribute_tokens and self.preprocess.aggregation != "none"),
            "--attribute_tokens needs --aggregation none",
        )


@dataclass
class MixConfig:
    """bergson's ``mix``: one autocorrelation Hessian from a query and an index one."""

    query_path: str = ""
    """Run dir of the query set's autocorrelation Hessian (ours or bergson's)."""
    index_path: str = ""
    """Run dir of the training (index) set's autocorrelation Hessian (ours or bergson's)."""
    output_path: str = ""
    """Directory the mixed Hessian is written to (as OUTPUT.part, renamed when complete)."""
    target_downweight_components: int = 1000
    """Component k where the sorted eigenvalue curves of the two weighted Hessians cross (sets the mixing weight)."""
    overwrite: bool = False
    """Replace an existing output directory."""

    def __post_init__(self) -> None:
        require(bool(self.query_path), "--query_path is required (the query set's Hessian)")
        require(bool(self.index_path), "--index_path is required (the training set's Hessian)")
        require(bool(self.output_path), "--output_path is required")


__all__ = ["TRACKSTAR_PROJECTION_DIM", "MixConfig", "TrackstarRunConfig"]
