"""``bergson-ray reduce RUN_PATH ...``: one mean/sum gradient of a dataset (a query store)."""

from __future__ import annotations

import argparse

from ..config import BuildConfig
from .args import add_dataclass_args, build_dataclass

HELP = "aggregate a dataset's gradients into one row (mean or sum) via a reducer actor"


def add_parser(sub) -> None:
    p = sub.add_parser("reduce", help=HELP, description=HELP)
    p.add_argument("run_path", help="output directory")
    add_dataclass_args(p, BuildConfig, skip=("run_path",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipelines.reduce import reduce

    cfg = build_dataclass(BuildConfig, args, **{"run.run_path": args.run_path})
    print(f"aggregated gradient written to {reduce(cfg)}")
    return 0
