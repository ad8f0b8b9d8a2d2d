"""A command whose options are exactly one config dataclass (build, score, hessian, ...).

Such a command is declared in one line: its name, its config class, the pipeline
function that runs it and what to print when done. The positional ``RUN_PATH`` fills
``run.run_path``; every other option is a flag made from the config (``cli/args.py``).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .args import add_dataclass_args, build_dataclass
from .preflight import check_paths

RUN_PATH_HELP = "output directory (written as RUN_PATH.part, renamed when complete)"


@dataclass(frozen=True)
class ConfigCommand:
    """One sub-command backed by one config class and one pipeline function."""

    name: str
    config: type
    help: str
    pipeline: str
    """``module:function`` of the pipeline, imported only when the command runs."""
    done: str
    """What to print with the pipeline's result, e.g. ``"gradient store written to {}"``."""
    run_path_help: str = RUN_PATH_HELP
    migrate: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """Rewrites a pipeline-file step body from older bergson layouts before translation."""

    def add_parser(self, sub: Any) -> None:
        p = sub.add_parser(self.name, help=self.help, description=self.help)
        p.add_argument("run_path", help=self.run_path_help)
        add_dataclass_args(p, self.config, skip=("run_path", "run.run_path"))
        p.set_defaults(func=self.run)

    def config_from_args(self, args: argparse.Namespace) -> Any:
        return build_dataclass(self.config, args, **{"run.run_path": args.run_path})

    def execute(self, cfg: Any) -> Any:
        """Run the pipeline on a config; returns what it returns (usually the run dir)."""
        check_paths(cfg)  # a missing path costs a second, not the pipeline's imports
        module, func = self.pipeline.split(":")
        return getattr(importlib.import_module(module), func)(cfg)

    def run(self, args: argparse.Namespace) -> int:
        print(self.done.format(self.execute(self.config_from_args(args))))
        return 0
