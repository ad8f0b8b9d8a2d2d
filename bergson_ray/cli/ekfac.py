"""``bergson-ray ekfac RUN_PATH ...``: query gradients -> EK-FAC -> H^-1 q -> scores."""

from __future__ import annotations

from ..config import EkfacRunConfig
from .command import ConfigCommand

COMMAND = ConfigCommand(
    "ekfac",
    EkfacRunConfig,
    "EK-FAC influence pipeline: query gradients, factors, H^-1 query, scores (on Ray)",
    "bergson_ray.pipelines.ekfac:ekfac",
    "EK-FAC scores written to {}",
    run_path_help="directory holding query/, hessian/<method>/, <method>_query/, scores/",
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
