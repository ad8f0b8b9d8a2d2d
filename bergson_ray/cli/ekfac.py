"""``bergson-ray ekfac RUN_PATH --query.dataset Q ...``: query grads -> EK-FAC -> H⁻¹q -> scores."""

from __future__ import annotations

import argparse

from .args import add_dataclass_args, build_dataclass

HELP = "EK-FAC influence pipeline: query gradients, factors, H^-1 query, scores (on Ray)"


def add_parser(sub) -> None:
    from ..pipelines.ekfac import EkfacRunConfig

    p = sub.add_parser("ekfac", help=HELP, description=HELP)
    p.add_argument(
        "run_path", help="directory holding query/, hessian/<method>/, <method>_query/, scores/"
    )
    add_dataclass_args(p, EkfacRunConfig, skip=("run_path", "run.run_path"))
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from ..pipelines.ekfac import EkfacRunConfig

    return build_dataclass(EkfacRunConfig, args, **{"run.run_path": args.run_path})


def run(args: argparse.Namespace) -> int:
    from ..pipelines.ekfac import ekfac

    path = ekfac(config_from_args(args))
    print(f"EK-FAC scores written to {path}")
    return 0
