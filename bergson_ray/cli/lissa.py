"""``bergson-ray lissa RUN_PATH ...``: query gradients -> LiSSA (G + damping I)^-1 q -> scores."""

from __future__ import annotations

from ..config.lissa import LissaRunConfig
from .command import ConfigCommand

COMMAND = ConfigCommand(
    "lissa",
    LissaRunConfig,
    "LiSSA influence: full query gradients, their damped Gauss-Newton inverse-Hessian-vector "
    "products estimated by LiSSA (queries and repeats spread over Ray workers), scores",
    "bergson_ray.pipelines.lissa:lissa",
    "LiSSA scores written to {}",
    run_path_help="directory holding query/, lissa_query/, scores/",
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
