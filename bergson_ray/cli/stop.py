"""``bergson-ray stop --name N``: end a query service's actors (and its HTTP endpoint)."""

from __future__ import annotations

import argparse

HELP = "stop a query service"


def add_parser(sub) -> None:
    p = sub.add_parser("stop", help=HELP, description=HELP)
    p.add_argument("--name", required=True, help="service name given to `serve`")
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS or auto)")
    p.add_argument(
        "--namespace", default="bergson_ray", help="Ray namespace of the service's actors"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipelines.serve import connect_cluster, stop

    connect_cluster(args.address, args.namespace, start_if_missing=False)
    stopped = stop(args.name, args.namespace)
    print(f"stopped {', '.join(stopped)}")
    return 0
