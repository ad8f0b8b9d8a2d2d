"""``bergson-ray validate RUN_PATH --scores SCORE_DIR ...``: leave-k-out validation on Ray.

Flags are bergson 2.5.1's. As there, ``--fraction``, ``--count`` and ``--paths`` belong
to the selected ``--method``: with ``--method filter`` they set the filter's fraction
and its random controls' count and banks (``--filter.fraction``, ``--filter.controls.count``,
``--filter.controls.paths`` name them explicitly), and ``--controls`` is bergson's alias of the
controls' kind.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config.validation import ValidateConfig, migrate_validation
from .command import ConfigCommand

HELP = "validate attribution scores by retraining without subsets (LDS) on Ray"

_FILTER_ALIASES = {
    "cfg__lds__fraction": "cfg__filter__fraction",
    "cfg__lds__count": "cfg__filter__controls__count",
    "cfg__lds__paths": "cfg__filter__controls__paths",
}
"""bergson's method-dependent flags: LDS field -> the filter field they mean there."""


class ValidateCommand(ConfigCommand):
    """``validate``: the config command plus bergson's method-dependent flag aliases."""

    def add_parser(self, sub: Any) -> None:
        super().add_parser(sub)
        p = sub.choices[self.name]
        p.add_argument(
            "--controls", dest="cfg__filter__controls__kind", default=argparse.SUPPRESS,
            choices=["retrain", "bank", "none"], help="bergson's alias of --kind (filter controls)",
        )

    def config_from_args(self, args: argparse.Namespace) -> ValidateConfig:
        if getattr(args, "cfg__method", "lds") == "filter":
            for lds_key, filter_key in _FILTER_ALIASES.items():
                if hasattr(args, lds_key) and not hasattr(args, filter_key):
                    setattr(args, filter_key, getattr(args, lds_key))
                    delattr(args, lds_key)
        return super().config_from_args(args)

    def run(self, args: argparse.Namespace) -> int:
        path = Path(self.execute(self.config_from_args(args)))
        summary = json.loads((path / "summary.json").read_text())
        if "mean_lds" in summary:
            print(
                f"mean LDS (Spearman over {summary['num_subsets']} subsets): "
                f"{summary['mean_lds']:.4f}"
            )
        print(self.done.format(path))
        return 0


COMMAND = ValidateCommand(
    "validate",
    ValidateConfig,
    HELP,
    "bergson_ray.pipelines.validate:validate",
    "validation written to {}",
    migrate=migrate_validation,
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
