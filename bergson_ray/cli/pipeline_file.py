"""``bergson-ray FILE.yaml``: run a pipeline document, bergson's or ours, step by step.

A document is ``{run_path?, resume?, steps: [{command: {...}}, ...]}``; a step may carry a
``matrix`` (one run per grid cell). Every step is translated and validated **before the
first one runs**, so a typo in step 3 costs seconds, not the hours of steps 1 and 2. A
step that asks to resume and whose run directory is already complete is skipped; the
resolved document (every option, defaults included) is written to
``<run_path>/config.yaml`` so the pipeline can be replayed.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from pathlib import Path
from typing import Any

import yaml

from ..config.bergson_steps import (
    BERGSON_COMMANDS,
    Step,
    expand_matrix,
    step_config,
    step_resume,
)
from ..config.coerce import section_of
from ..errors import BadInputError

log = logging.getLogger(__name__)

CONFIG_FILENAME = "config.yaml"


def is_pipeline_argument(argv: list[str]) -> str | None:
    """The document path if ``argv`` is ``[FILE.yaml]`` (or ``[command, FILE.yaml]``, as
    bergson accepts) or a run directory holding a ``config.yaml``; else None."""
    if not 1 <= len(argv) <= 2 or argv[-1].startswith("-"):
        return None
    path = argv[-1]
    if path.endswith((".yaml", ".yml")):
        return path
    if len(argv) == 1 and (Path(path) / CONFIG_FILENAME).is_file():
        return str(Path(path) / CONFIG_FILENAME)
    return None


def read_document(path: str | Path) -> dict[str, Any]:
    """The document at ``path``: a mapping with a ``steps:`` list."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"no such pipeline file: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise BadInputError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise BadInputError(
            f"{path} must be a mapping with a non-empty `steps:` list of `- command: {{...}}`"
        )
    return doc


def plan(doc: dict[str, Any], commands: dict[str, str]) -> list[Step]:
    """Every step of ``doc`` as our config, validated; nothing runs."""
    steps: list[Step] = []
    resume_all = bool(doc.get("resume"))
    for i, raw in enumerate(doc["steps"], start=1):
        if not isinstance(raw, dict) or len(raw) != 1:
            raise BadInputError(
                f"step {i} must be one `command: {{...}}` mapping, got {raw!r}"
            )
        ((name, body),) = raw.items()
        command = str(name).lower()
        if command not in commands:
            if command in BERGSON_COMMANDS:
                raise BadInputError(
                    f"step {i}: bergson's `{command}` is not implemented in bergson-ray yet"
                )
            known = sorted(set(commands) | set(BERGSON_COMMANDS))
            raise BadInputError(
                f"step {i}: unknown command {name!r}; known commands: {', '.join(known)}"
            )
        cmd = _command(commands[command])
        if cmd is None:
            raise BadInputError(f"step {i}: `{command}` cannot run from a pipeline file")
        if body is not None and not isinstance(body, dict):
            raise BadInputError(f"step {i} ({command}): expected a mapping of options, got {body!r}")
        for cell in expand_matrix(dict(body or {})):
            where = f"step {i} ({command})"
            if cmd.migrate is not None:
                try:
                    cell = cmd.migrate(cell)
                except BadInputError as err:
                    raise BadInputError(f"{where}: {err}") from None
            cfg = step_config(command, cell, cmd.config, where)
            steps.append(Step(i, command, cfg, resume_all or step_resume(cell)))
    return steps


def _command(module: str):
    """The :class:`~bergson_ray.cli.command.ConfigCommand` of a CLI module, if any."""
    return getattr(importlib.import_module(module), "COMMAND", None)


def run_path_of(cfg: Any) -> str:
    path = section_of(type(cfg), "run_path")
    if path is None:
        return ""
    value: Any = cfg
    for part in path:
        value = getattr(value, part)
    return str(value or "")


def run_document(path: str | Path, commands: dict[str, str]) -> int:
    """Run every step of the document at ``path`` in order; returns an exit code."""
    doc = read_document(path)
    steps = plan(doc, commands)
    for n, step in enumerate(steps, start=1):
        out = run_path_of(step.config)
        if step.resume and out and Path(out).is_dir():
            print(f"[pipeline] {step.label} already complete at {out}: skipped")
            continue
        print(f"[pipeline] {n}/{len(steps)}: {step.command}")
        cmd = _command(commands[step.command])
        result = cmd.execute(step.config)
        print(cmd.done.format(result))
    _save_resolved(doc, steps)
    return 0


def _save_resolved(doc: dict[str, Any], steps: list[Step]) -> None:
    root = doc.get("run_path")
    if not root or any(run_path_of(s.config) == str(root) for s in steps):
        return  # no pipeline dir, or it is a step's own run dir (its config.yaml stays)
    resolved = {
        "run_path": str(root),
        "steps": [{s.command: dataclasses.asdict(s.config)} for s in steps],
    }
    target = Path(root) / CONFIG_FILENAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
    tmp.replace(target)
