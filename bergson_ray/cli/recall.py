"""``bergson-ray recall RUN_PATH --scores SCORE_DIR ...``: MRR and Recall@k of a score dir
on bergson's synthetic facts benchmark (its datasets generated locally, never downloaded).

The flags are bergson 2.5.1's, ``-k`` included; the metrics are printed as a short table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..config.recall import RecallConfig
from .command import ConfigCommand

HELP = (
    "evaluate attribution scores by synthetic factual recall (MRR, Recall@k) against "
    "locally generated fact statements"
)


class RecallCommand(ConfigCommand):
    """``recall``: the config command plus bergson's short ``-k`` and a metrics table."""

    def add_parser(self, sub: Any) -> None:
        super().add_parser(sub)
        p = sub.choices[self.name]
        p.add_argument(
            "-k", dest="cfg__k", type=int, metavar="N", default=argparse.SUPPRESS,
            help="same as --k",
        )

    def run(self, args: argparse.Namespace) -> int:
        from ..recall.report import format_table

        path = Path(self.execute(self.config_from_args(args)))
        print(format_table(json.loads((path / "summary.json").read_text())))
        print(self.done.format(path))
        return 0


COMMAND = RecallCommand(
    "recall",
    RecallConfig,
    HELP,
    "bergson_ray.pipelines.recall:recall",
    "recall written to {}",
    run_path_help="directory for recall.csv, summary.csv and summary.json",
)
add_parser, config_from_args, run = COMMAND.add_parser, COMMAND.config_from_args, COMMAND.run
