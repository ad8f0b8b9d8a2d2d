"""``bergson-ray build RUN_PATH ...``: per-example gradient store (bergson's flags)."""

from __future__ import annotations

import argparse

from ..config import BuildConfig
from .args import add_dataclass_args, build_dataclass

HELP = "build a per-example gradient store of a dataset on Ray"


def add_parser(sub) -> None:
    p = sub.add_parser("build", help=HELP, description=HELP)
    p.add_argument("run_path", help="output directory (written as RUN_PATH.part, renamed at the end)")
    add_dataclass_args(p, BuildConfig, skip=("run_path",))
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    return build_dataclass(BuildConfig, args, **{"run.run_path": args.run_path})


def run(args: argparse.Namespace) -> int:
    from ..pipelines.build import build

    path = build(config_from_args(args))
    print(f"gradient store written to {path}")
    return 0
