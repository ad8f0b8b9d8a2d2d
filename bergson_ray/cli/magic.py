"""``bergson-ray magic RUN_PATH ...``: exact metagradients through training (MAGIC,
bergson 2.5.1's ``magic`` flags: ``--query.dataset``, ``--aggregation``,
``--attribute_tokens``, ``--double_backward_batch_size``, ``--skip_validation`` ...)."""

from __future__ import annotations

from ..config.magic import MagicRunConfig
from ..config.validation import migrate_validation
from .command import ConfigCommand

COMMAND = ConfigCommand(
    "magic",
    MagicRunConfig,
    "exact data-weight metagradients through training (MAGIC), one reverse pass per query on Ray",
    "bergson_ray.pipelines.magic:magic",
    "MAGIC scores written to {}/scores",
    migrate=migrate_validation,  # bergson's old num_subsets / subset_fraction keys
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
