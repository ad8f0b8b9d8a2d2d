"""``bergson-ray mix --query_path Q --index_path I --output_path OUT``: TrackStar's mixing step.

bergson's ``mix`` takes no positional argument (the output is ``--output_path``), so
this command keeps :class:`ConfigCommand`'s pipeline wiring but builds its parser
without the ``RUN_PATH`` positional, and a bergson command line works unchanged.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from ..config.trackstar import MixConfig
from .args import add_dataclass_args, build_dataclass
from .command import ConfigCommand


@dataclass(frozen=True)
class FlagsOnlyCommand(ConfigCommand):
    """A :class:`ConfigCommand` whose every option is a flag (no ``RUN_PATH``)."""

    def add_parser(self, sub: Any) -> None:
        p = sub.add_parser(self.name, help=self.help, description=self.help)
        add_dataclass_args(p, self.config)
        p.set_defaults(func=self.run)

    def config_from_args(self, args: argparse.Namespace) -> Any:
        return build_dataclass(self.config, args)


COMMAND = FlagsOnlyCommand(
    "mix",
    MixConfig,
    "Mix a query and a training autocorrelation Hessian into one (TrackStar's lambda rule)",
    "bergson_ray.pipelines.mix:mix",
    "mixed Hessian written to {}",
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
