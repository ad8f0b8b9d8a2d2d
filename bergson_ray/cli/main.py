"""``bergson-ray`` entry point: one sub-command per module in :data:`COMMANDS`.

Each command module exposes ``add_parser(subparsers)``, which registers its parser
and sets ``func=run`` where ``run(args) -> int``. Modules are imported lazily so
``bergson-ray --help`` stays fast and a broken optional command never takes the
others down.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import BergsonRayError, unwrap

COMMANDS: dict[str, str] = {
    "quickstart": "bergson_ray.cli.quickstart",
    "build": "bergson_ray.cli.build",
    "reduce": "bergson_ray.cli.reduce",
    "score": "bergson_ray.cli.score",
    "hessian": "bergson_ray.cli.hessian",
    "ekfac": "bergson_ray.cli.ekfac",
    "query": "bergson_ray.cli.query",
    "serve": "bergson_ray.cli.serve",
    "status": "bergson_ray.cli.status",
    "stop": "bergson_ray.cli.stop",
}

log = logging.getLogger("bergson_ray")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bergson-ray",
        description="Ray-distributed data attribution for language models.",
    )
    parser.add_argument("--log_level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for modname in COMMANDS.values():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as err:
            if err.name == modname:  # command not implemented in this build
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - translate user errors into one line
        err = unwrap(exc)
        if isinstance(err, BergsonRayError):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
