"""``bergson-ray trak RUN_PATH ...``: log-odds gradients, Gram, G^-1 query, weighted scores."""

from __future__ import annotations

from ..config.trak import TrakRunConfig
from .command import ConfigCommand

COMMAND = ConfigCommand(
    "trak",
    TrakRunConfig,
    "TRAK attribution: projected negative log-odds gradients, the inverse Gram on the query "
    "side, (1 - p) weights, averaged over --checkpoints (on Ray)",
    "bergson_ray.pipelines.trak:trak",
    "TRAK scores written to {}",
    run_path_help=(
        "directory holding train/, train_probs/, train_hessian/, query/, scores/ "
        "(one checkpoint_<i>/ of them per --checkpoints member, and the ensemble's scores/)"
    ),
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
