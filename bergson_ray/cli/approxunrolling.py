"""``bergson-ray approxunrolling RUN_PATH --checkpoints ...``: SOURCE (approximate unrolling)."""

from __future__ import annotations

from ..config.approxunrolling import ApproxUnrollingRunConfig
from .command import ConfigCommand

COMMAND = ConfigCommand(
    "approxunrolling",
    ApproxUnrollingRunConfig,
    "SOURCE / approximate unrolling (Bae et al. 2024): EK-FAC factors at every training "
    "checkpoint (in parallel on Ray), averaged per segment, the query walked back through "
    "training, per-segment scores summed",
    "bergson_ray.pipelines.approxunrolling:approxunrolling",
    "SOURCE scores written to {}",
    run_path_help=(
        "directory holding exported/, query/, segment_<l>/ (per-checkpoint and per-segment "
        "factors, transformed queries, per-checkpoint scores) and scores/"
    ),
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
