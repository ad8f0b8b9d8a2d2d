"""``bergson-ray metasmoothness RUN_PATH ...``: bergson 2.5.1's metasmoothness probe."""

from __future__ import annotations

from ..config.training import MetasmoothnessRunConfig
from .command import ConfigCommand

COMMAND = ConfigCommand(
    "metasmoothness",
    MetasmoothnessRunConfig,
    "score how linearly training responds to data weights (three trainings)",
    "bergson_ray.pipelines.metasmoothness:metasmoothness",
    "metasmoothness written to {}",
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
