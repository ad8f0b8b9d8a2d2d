"""``bergson-ray trackstar RUN_PATH ...``: value + query Hessians -> mix -> H^-1 query -> scores."""

from __future__ import annotations

from ..config.trackstar import TrackstarRunConfig
from .command import ConfigCommand

COMMAND = ConfigCommand(
    "trackstar",
    TrackstarRunConfig,
    "TrackStar attribution: value and query autocorrelation Hessians (fitted together), "
    "their mix, the preconditioned query, scores (on Ray)",
    "bergson_ray.pipelines.trackstar:trackstar",
    "TrackStar scores written to {}",
    run_path_help=(
        "directory holding value_hessian/, query_hessian/, mixed_hessian/, query/, scores/"
    ),
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
