"""``bergson-ray score RUN_PATH ...``: score a dataset against a query store."""

from __future__ import annotations

from ..config import ScoreRunConfig
from .command import ConfigCommand

COMMAND = ConfigCommand(
    "score",
    ScoreRunConfig,
    "stream a dataset through gradient workers and score it against a query store",
    "bergson_ray.pipelines.score:score",
    "scores written to {}",
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
