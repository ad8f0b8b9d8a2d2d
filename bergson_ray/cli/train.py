"""``bergson-ray train RUN_PATH ...``: train a model (bergson 2.5.1's ``train`` flags)."""

from __future__ import annotations

from ..config.training import TrainRunConfig
from .command import ConfigCommand

COMMAND = ConfigCommand(
    "train",
    TrainRunConfig,
    "train a causal LM with bergson's trainer (AdamW/SGD/Muon, data weights, checkpoints)",
    "bergson_ray.pipelines.train:train",
    "trained run written to {}",
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
