"""``bergson-ray reduce RUN_PATH ...``: one mean/sum gradient of a dataset (a query store)."""

from __future__ import annotations

from ..config import BuildConfig
from .command import ConfigCommand

COMMAND = ConfigCommand(
    "reduce",
    BuildConfig,
    "aggregate a dataset's gradients into one row (mean or sum) via a reducer actor",
    "bergson_ray.pipelines.reduce:reduce",
    "aggregated gradient written to {}",
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
