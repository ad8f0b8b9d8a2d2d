"""``bergson-ray`` entry point: one sub-command per module in :data:`COMMANDS`.

Each command module exposes ``add_parser(subparsers)``, which registers its parser
and sets ``func=run`` where ``run(args) -> int``. Modules are imported lazily so
``bergson-ray --help`` stays fast and a broken optional command never takes the
others down.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import logging
import os
import sys
import threading
from typing import NoReturn

from ..errors import BergsonRayError, one_line, unwrap

COMMANDS: dict[str, str] = {
    "quickstart": "bergson_ray.cli.quickstart",
    "build": "bergson_ray.cli.build",
    "reduce": "bergson_ray.cli.reduce",
    "score": "bergson_ray.cli.score",
    "hessian": "bergson_ray.cli.hessian",
    "ekfac": "bergson_ray.cli.ekfac",
    "train": "bergson_ray.cli.train",
    "validate": "bergson_ray.cli.validate",
    "metasmoothness": "bergson_ray.cli.metasmoothness",
    "magic": "bergson_ray.cli.magic",
    "trackstar": "bergson_ray.cli.trackstar",
    "mix": "bergson_ray.cli.mix",
    "approxunrolling": "bergson_ray.cli.approxunrolling",
    "lissa": "bergson_ray.cli.lissa",
    "trak": "bergson_ray.cli.trak",
    "recall": "bergson_ray.cli.recall",
    "test_model_configuration": "bergson_ray.cli.test_model_configuration",
    "query": "bergson_ray.cli.query",
    "report": "bergson_ray.cli.report",
    "serve": "bergson_ray.cli.serve",
    "status": "bergson_ray.cli.status",
    "stop": "bergson_ray.cli.stop",
}

log = logging.getLogger("bergson_ray")


def make_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; ``only``: register just that command (a command line names one,
    and importing the other command modules would add ~0.2 s to every start-up)."""
    parser = argparse.ArgumentParser(
        prog="bergson-ray",
        description="Ray-distributed data attribution for language models.",
    )
    parser.add_argument("--log_level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as err:
            if err.name == modname:  # command not implemented in this build
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    document, log_level = _pipeline_document(argv)
    if document is not None:
        _setup_logging(log_level)
        from .pipeline_file import run_document

        return _guarded(lambda: run_document(document, COMMANDS))
    named = _command_name(argv)
    parser = make_parser(named if named in COMMANDS else None)  # a typo lists every command
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return _guarded(lambda: args.func(args))


def _command_name(argv: list[str]) -> str | None:
    """The command a command line names: its first word after the top-level options."""
    rest = list(argv)
    while rest and rest[0].startswith("-"):
        flag = rest.pop(0)
        if flag == "--log_level" and rest:
            rest.pop(0)
        elif flag in ("-h", "--help"):
            return None
    return rest[0] if rest else None


def _pipeline_document(argv: list[str]) -> tuple[str | None, str]:
    """``bergson-ray [--log_level L] FILE.yaml``: the document path and log level."""
    from .pipeline_file import is_pipeline_argument

    level = "INFO"
    if len(argv) >= 2 and argv[0] == "--log_level":
        level, argv = argv[1], argv[2:]
    return is_pipeline_argument(argv), level


def _setup_logging(level: str) -> None:
    """Our messages at ``level``; other libraries' only from WARNING up unless DEBUG is
    asked for (faiss, datasets and Ray announce their internals at INFO)."""
    ours = getattr(logging, str(level).upper(), logging.INFO)
    logging.basicConfig(
        level=ours if ours <= logging.DEBUG else max(ours, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("bergson_ray").setLevel(ours)
    if ours > logging.DEBUG:
        # datasets' own bars ("Saving the dataset", "Map") sit between our one bar per
        # stage; read at import, so set before anything imports datasets
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _guarded(call) -> int:
    """Run a command; a user error becomes one line on stderr and exit code 2."""
    try:
        return int(call() or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - translate user errors into one line
        err = unwrap(exc)
        if isinstance(err, BergsonRayError):
            print(f"error: {one_line(err)}", file=sys.stderr)
            return 2
        raise


def entry() -> NoReturn:
    """The ``bergson-ray`` console script: :func:`main`, then :func:`exit_now`."""
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's module teardown.

    With torch, transformers and datasets loaded, Python's own exit frees every module and
    runs their finalizers: 0.6-1.5 s on a 2-core machine, after the run has been committed.
    By then the command's files are written and renamed, so this runs the ``atexit``
    handlers (Ray's shutdown, temporary-directory clean-up), flushes logging and the
    standard streams, and calls ``os._exit``. It exits the normal way while another
    non-daemon thread still runs (``os._exit`` would cut it off), under a profiler or
    tracer (``python -m cProfile`` writes its file after the program returns), or with
    ``BERGSON_RAY_FULL_EXIT=1``.
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    watched = sys.getprofile() is not None or sys.gettrace() is not None
    if others or watched or os.environ.get("BERGSON_RAY_FULL_EXIT") == "1":
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe must not turn into a traceback
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
