"""``bergson-ray query``: top-k training documents for query texts.

Non-interactive: ``--query TEXT`` (repeatable) prints the hits as text, JSON or CSV and
exits. Without ``--query`` it prompts for texts like ``bergson query`` does (an empty
line or Ctrl-D ends). With ``--name`` it asks a running service (``bergson-ray serve``);
otherwise it searches ``--index STORE`` in this process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import FaissConfig
from ..errors import BadInputError
from .args import add_dataclass_args, build_dataclass

HELP = "find the training documents most (or least) similar to query texts"


def add_parser(sub) -> None:
    p = sub.add_parser("query", help=HELP, description=HELP)
    p.add_argument("--index", default="", help="gradient store to search in this process")
    p.add_argument("--name", default="", help="ask the running service of this name instead")
    p.add_argument("--address", default=None, help="Ray cluster of the service (default: auto)")
    p.add_argument(
        "--namespace", default="bergson_ray", help="Ray namespace of the service's actors"
    )
    p.add_argument("--query", action="append", default=[], help="query text (repeatable)")
    p.add_argument(
        "--completion",
        action="append",
        default=[],
        help="completion for the matching --query: a (prompt, completion) pair, loss on the completion",
    )
    p.add_argument("--k", "--top_k", dest="k", type=int, default=10, help="hits per query")
    p.add_argument("--bottom_k", type=int, default=0, help="also show the k least similar")
    p.add_argument(
        "--format", choices=["text", "json", "csv"], default="text", help="output format"
    )
    p.add_argument("--record", default="", help="append every result to this CSV file")
    p.add_argument("--model", default="", help="override the store's model")
    p.add_argument(
        "--text_field", default="text", help="column of the store's dataset shown with each hit"
    )
    add_dataclass_args(p, FaissConfig)
    p.set_defaults(func=run)


class _Searcher:
    """The service client or an in-process Attributor behind one interface."""

    def __init__(self, args: argparse.Namespace):
        if args.name:
            from ..query.client import connect

            self.impl = connect(args.address or "auto", args.name, namespace=args.namespace)
        elif args.index:
            from ..query.attributor import Attributor

            cfg = build_dataclass(FaissConfig, args)
            self.impl = Attributor(args.index, cfg, model=args.model, text_field=args.text_field)
        else:
            raise BadInputError("give --index STORE (search here) or --name SERVICE")

    def run(self, queries: list, k: int, bottom_k: int) -> list:
        out = list(self.impl.query(queries, k=k))  # the searcher validates k
        if bottom_k > 0:
            out += self.impl.query(queries, k=bottom_k, reverse=True)
        return out


def _emit(results: list, fmt: str, record: str) -> None:
    from ..query.results import format_csv, format_json, format_text

    text = {"text": format_text, "json": format_json, "csv": format_csv}[fmt](results)
    print(text)
    if record:
        path = Path(record)
        body = format_csv(results)
        if path.exists() and path.stat().st_size > 0:
            body = body.split("\n", 1)[1]  # header once
        with path.open("a") as f:
            f.write(body)


def _queries(args: argparse.Namespace) -> list:
    if not args.completion:
        return list(args.query)
    if len(args.completion) != len(args.query):
        raise BadInputError("give one --completion per --query (or none)")
    return list(zip(args.query, args.completion))


def run(args: argparse.Namespace) -> int:
    searcher = _Searcher(args)
    if args.query:
        _emit(searcher.run(_queries(args), args.k, args.bottom_k), args.format, args.record)
        return 0
    interactive = sys.stdin.isatty()
    while True:
        try:
            text = input("query> " if interactive else "")
        except EOFError:
            break
        if not text.strip():
            if interactive:
                break
            continue
        try:
            _emit(searcher.run([text], args.k, args.bottom_k), args.format, args.record)
        except BadInputError as err:  # keep the prompt alive
            print(f"error: {err}", file=sys.stderr)
    return 0
