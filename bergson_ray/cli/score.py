"""``bergson-ray score RUN_PATH --query_path Q ...``: score a dataset against a query store."""

from __future__ import annotations

import argparse

from ..config import ScoreRunConfig
from .args import add_dataclass_args, build_dataclass

HELP = "stream a dataset through gradient workers and score it against a query store"


def add_parser(sub) -> None:
    p = sub.add_parser("score", help=HELP, description=HELP)
    p.add_argument("run_path", help="output directory (scores.bin, info.json, data.hf, ...)")
    add_dataclass_args(p, ScoreRunConfig, skip=("run_path",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipelines.score import score

    cfg = build_dataclass(ScoreRunConfig, args, **{"run.run_path": args.run_path})
    print(f"scores written to {score(cfg)}")
    return 0
