"""``bergson-ray hessian RUN_PATH --method kfac|tkfac|shampoo|autocorrelation ...``."""

from __future__ import annotations

import argparse

from ..hessians.config import HessianRunConfig
from .args import add_dataclass_args, build_dataclass

HELP = "fit a Hessian approximation (dense autocorrelation, or KFAC/TKFAC/Shampoo + EK-FAC) on Ray"


def add_parser(sub) -> None:
    p = sub.add_parser("hessian", help=HELP, description=HELP)
    p.add_argument(
        "run_path", help="output directory (written as RUN_PATH.part, renamed at the end)"
    )
    add_dataclass_args(p, HessianRunConfig, skip=("run_path", "run.run_path"))
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> HessianRunConfig:
    return build_dataclass(HessianRunConfig, args, **{"run.run_path": args.run_path})


def run(args: argparse.Namespace) -> int:
    from ..pipelines.hessian import hessian

    path = hessian(config_from_args(args))
    print(f"Hessian written to {path}")
    return 0
