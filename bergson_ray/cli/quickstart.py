"""``bergson-ray quickstart``: the tiny default end to end on a local Ray."""

from __future__ import annotations

import argparse
import time

HELP = "build the tiny default, index its corpus and show the nearest training docs"


def add_parser(sub) -> None:
    p = sub.add_parser("quickstart", help=HELP, description=HELP)
    p.add_argument(
        "--run_path", default="runs/quickstart", help="where the tiny store is written"
    )
    p.add_argument(
        "--projection_dim", type=int, default=16, metavar="N", help="per-module projection size"
    )
    p.add_argument("--k", type=int, default=5, metavar="N", help="documents shown per prompt")
    p.add_argument(
        "--num_workers", type=int, default=0, metavar="N", help="gradient workers (0 = auto)"
    )
    p.add_argument("--query", action="append", help="a prompt to attribute (repeatable)")
    p.add_argument(
        "--split", default="train", metavar="SPLIT",
        help="rows of the tiny corpus to index (e.g. 'train[:300]' for a quicker look)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipelines.quickstart import EXAMPLE_PROMPTS, format_hits, quickstart

    t0 = time.perf_counter()
    prompts = tuple(args.query) if args.query else EXAMPLE_PROMPTS
    results = quickstart(
        args.run_path, prompts, k=args.k, projection_dim=args.projection_dim,
        num_workers=args.num_workers, split=args.split,
    )
    print(format_hits(prompts, results))
    print(f"\nquickstart finished in {time.perf_counter() - t0:.1f}s (store: {args.run_path}/index)")
    return 0
