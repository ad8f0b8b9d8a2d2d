"""``bergson-ray report RUN [RUN ...] [--out DIR] [--top N] [--service NAME]``

An HTML page with PNG figures for finished runs: score stores (score distributions, the
top and bottom documents of each query with their text), validate runs (predicted vs
actual loss change, the LDS per query; runs on the same subsets compared), and with
``--service`` the query latency of a running service, measured here.
"""

from __future__ import annotations

import argparse

HELP = "write an HTML report (with PNG figures) of score, validate or service runs"


def add_parser(sub) -> None:
    p = sub.add_parser("report", help=HELP, description=HELP)
    p.add_argument(
        "runs", nargs="*", metavar="RUN",
        help="score run (or a run with scores/), validate run (or a run with validation/); "
        "several validate runs on the same subsets are compared",
    )
    p.add_argument("--out", default=None,
                   help="report directory (default: RUN/report of the first RUN)")
    p.add_argument("--top", type=int, default=10,
                   help="highest and lowest scoring documents shown per query (default: 10)")
    p.add_argument("--max_queries", type=int, default=16,
                   help="query columns shown per score store or plotted per validate run "
                   "(default: 16)")
    g = p.add_argument_group("query service latency")
    g.add_argument("--service", default="",
                   help="also time queries against the running service of this name")
    g.add_argument("--address", default=None, help="Ray cluster of the service (default: auto)")
    g.add_argument("--namespace", default="bergson_ray",
                   help="Ray namespace of the service's actors (default: bergson_ray)")
    g.add_argument("--query", action="append", default=[],
                   help="query text to time (repeatable; default: three short built-in texts)")
    g.add_argument("--repeats", type=int, default=5,
                   help="times each query is sent (default: 5)")
    g.add_argument("--k", type=int, default=10, help="hits per timed query (default: 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import BadInputError
    from ..report import kinds, plots
    from ..report.writer import check_out, write_report

    plots.require_matplotlib()
    if not args.runs and not args.service:
        raise BadInputError("give at least one RUN directory (or --service NAME) to report on")
    if args.repeats < 1:
        raise BadInputError(f"--repeats must be at least 1, got {args.repeats}")
    for r in args.runs:  # an unknown directory fails before Ray is touched
        kinds.detect(r)
    if args.out is not None:
        check_out(Path(args.out))
    latency = None
    if args.service:
        from ..query.client import connect
        from ..report.latency import service_latency

        client = connect(args.address or "auto", args.service, namespace=args.namespace)
        latency = service_latency(client, args.query, args.repeats, args.k)
    out = write_report(args.runs, args.out, top=args.top, max_queries=args.max_queries,
                       latency=latency)
    print(f"report written to {out / 'index.html'}")
    return 0
