"""``bergson-ray hessian RUN_PATH ...``: Hessian factors on sharded accumulator actors."""

from __future__ import annotations

from ..config import HessianRunConfig
from .command import ConfigCommand

COMMAND = ConfigCommand(
    "hessian",
    HessianRunConfig,
    "fit a Hessian approximation (dense autocorrelation, or KFAC/TKFAC/Shampoo + EK-FAC) on Ray",
    "bergson_ray.pipelines.hessian:hessian",
    "Hessian written to {}",
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
