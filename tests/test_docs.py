"""Every ``bergson-ray ...`` command line in the docs parses (nothing is run).

Command lines are taken from code: fenced blocks (``\\``-continued lines joined, also
inside Python strings such as a job's ``entrypoint="bergson-ray ..."``) and inline code
spans. ``[--opt VALUE]`` (optional syntax) counts as written without the brackets; a
line with a placeholder that cannot stand for an argument (``<command>``, ``...``) is
skipped. A span that only names a command (``bergson-ray build``) must name a real one.
(``cluster/README.md`` has its own, stricter check in ``test_cluster_manifests.py``.)
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from bergson_ray.cli.main import make_parser
from bergson_ray.cli.pipeline_file import is_pipeline_argument

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]
PROG = "bergson-ray"
FENCE = re.compile(r"^\s*```")
SPAN = re.compile(r"`([^`\n]+)`")


def _command(text: str) -> str | None:
    """The ``bergson-ray`` command line in one line of code, or None."""
    at = text.find(PROG + " ")
    if at < 0 or (at and not re.match(r"[\s\"'$(]", text[at - 1])):
        return None
    rest = text[at + len(PROG) :]
    if at and text[at - 1] in "\"'":  # inside a string literal: up to its closing quote
        rest = rest.split(text[at - 1], 1)[0]
    return rest.strip()


def command_lines() -> list[tuple[str, str]]:
    """``(source:line, command line without the program name)`` for every doc."""
    found = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        in_block, i = False, 0
        while i < len(lines):
            line, where = lines[i], f"{path.relative_to(ROOT)}:{i + 1}"
            if FENCE.match(line):
                in_block = not in_block
            elif in_block:
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                cmd = _command(line)
                if cmd is not None:
                    found.append((where, cmd))
            else:
                for span in SPAN.findall(line):
                    cmd = _command(span)
                    if cmd is not None:
                        found.append((where, cmd))
            i += 1
    return found


COMMAND_LINES = command_lines()


def test_the_docs_have_command_lines():
    assert len(COMMAND_LINES) >= 10, COMMAND_LINES


@pytest.mark.parametrize(("where", "line"), COMMAND_LINES, ids=[w for w, _ in COMMAND_LINES])
def test_command_line_parses(where: str, line: str):
    argv = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)
    if any(tok == "..." or tok.startswith("<") for tok in argv):
        pytest.skip(f"{where}: placeholder in {line!r}")
    if is_pipeline_argument(argv):  # `bergson-ray FILE.yaml`: a pipeline document
        return
    parser = make_parser()
    if len(argv) == 1:  # a mention of a command, not a full command line
        commands = next(
            a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)
        )
        assert argv[0] in commands, f"{where}: `{PROG} {argv[0]}` is not a command"
        return
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `{PROG} {line}` does not parse (exit {exc.code})")
