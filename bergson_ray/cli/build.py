"""``bergson-ray build RUN_PATH ...``: per-example gradient store (bergson's flags)."""

from __future__ import annotations

from ..config import BuildConfig
from .command import ConfigCommand

COMMAND = ConfigCommand(
    "build",
    BuildConfig,
    "build a per-example gradient store of a dataset on Ray",
    "bergson_ray.pipelines.build:build",
    "gradient store written to {}",
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
