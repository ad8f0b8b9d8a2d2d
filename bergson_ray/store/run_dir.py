"""Run directories that only appear once they are complete (bergson-spec §1.1).

Every command writes into ``<run>.part`` and renames it to ``<run>`` at the very end,
so a directory named ``<run>`` is always a finished run and a crash leaves a ``.part``
that ``--resume`` can continue. An existing run is never replaced unless the user asked
for ``--overwrite``, and even then only at commit time, so a failing rerun does not
destroy the previous result.

``config.yaml`` uses bergson's document shape, ``{steps: [{<command>: {...}}],
metadata: {...}}``, so bergson's ``read_config``/``load_subconfig`` (and therefore
``load_scores_loss_signed``) accept our run directories.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from bergson_ray.errors import RunExistsError, StoreError
from bergson_ray.store.files import read_yaml

logger = logging.getLogger(__name__)

CONFIG_YAML = "config.yaml"
SUMMARY_JSON = "summary.json"
PART_SUFFIX = ".part"


def _plain(obj: Any) -> Any:
    """Dataclasses, paths, enums and tuples -> YAML-safe builtins (recursively)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Enum):
        return _plain(obj.value)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    return obj


def _command_name(obj: Any) -> str:
    """``BuildConfig`` -> ``build``: bergson's step key is the lowercased command."""
    name = type(obj).__name__.lower()
    return name.removesuffix("config") or "run"


def run_metadata() -> dict[str, Any]:
    from bergson_ray import __version__

    return {
        "bergson_ray_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


class RunDir:
    """Write-then-rename protocol for one run directory.

    ``RunDir(path)`` creates ``<path>.part``; write everything under :attr:`path`
    (which *is* the ``.part`` directory until :meth:`commit`), then call :meth:`commit`.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False, resume: bool = False):
        final = Path(os.path.normpath(os.fspath(path)))
        if not final.name or final.name in (".", ".."):
            raise StoreError(f"run path {os.fspath(path)!r} does not name a directory")
        self.final = final
        self.part = final.with_name(final.name + PART_SUFFIX)
        self.overwrite = overwrite
        self.resumed = False
        self.committed = False

        if resume and self.part.exists():
            if not self.part.is_dir():
                raise StoreError(f"{self.part} exists but is not a directory")
            logger.info("resuming the unfinished run in %s", self.part)
            self.resumed = True
        elif resume and self.final.exists():
            raise RunExistsError(
                f"{self.final} is already complete (there is no {self.part.name} to resume); "
                "use --overwrite without --resume to compute it again"
            )
        else:
            existing = [p for p in (self.final, self.part) if p.exists()]
            if existing and not overwrite:
                raise RunExistsError(
                    f"{' and '.join(map(str, existing))} already exist{'s' if len(existing) == 1 else ''}; "
                    "pass --overwrite to replace the run or --resume to continue an unfinished one"
                )
            if self.part.exists():  # stale leftovers of an earlier attempt
                logger.info("removing stale %s (--overwrite)", self.part)
                _remove(self.part)
            if resume:
                logger.info("nothing to resume at %s: starting a new run", self.part)
        self.part.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        """Where to write: the ``.part`` directory before commit, the final one after."""
        return self.final if self.committed else self.part

    def write_config(self, obj: Any, *, command: str | None = None) -> Path:
        """Write ``config.yaml``: a one-step bergson document plus run metadata.

        ``obj`` is a config dataclass (saved with ``dataclasses.asdict``) or a mapping of
        named sub-configs, e.g. ``{"score_cfg": score_cfg, "index_cfg": build_cfg}``
        (bergson's readers look for ``score_cfg`` to find ``higher_is_better``).
        ``command`` defaults to the class name without ``Config``, lowercased.
        """
        if command is None:
            if isinstance(obj, Mapping):
                raise StoreError("write_config needs command= when given a mapping")
            command = _command_name(obj)
        doc = {"steps": [{command: _plain(obj)}], "metadata": run_metadata()}
        path = self.path / CONFIG_YAML
        with path.open("w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        return path

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """``summary.json``: what the run did (counts, timings), for people and tests."""
        path = self.path / SUMMARY_JSON
        path.write_text(json.dumps(_plain(summary), indent=2, default=str) + "\n")
        return path

    def commit(self) -> Path:
        """Rename ``<run>.part`` -> ``<run>`` (replacing ``<run>`` only with overwrite)."""
        if self.committed:
            return self.final
        if not self.part.is_dir():
            raise StoreError(f"cannot commit: {self.part} is gone")
        old: Path | None = None
        if self.final.exists():
            if not self.overwrite:
                raise RunExistsError(
                    f"{self.final} appeared while this run was writing {self.part}; "
                    "pass --overwrite to replace it"
                )
            # Move the old run aside first so there is never a moment without a result.
            old = self.final.with_name(f"{self.final.name}.old-{os.getpid()}")
            if old.exists():
                _remove(old)
            os.replace(self.final, old)
        os.replace(self.part, self.final)
        if old is not None:
            _remove(old)
        self.committed = True
        logger.info("run committed to %s", self.final)
        return self.final


def read_run_config(run_dir: str | Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(command, config dict, metadata)`` of a run's ``config.yaml`` (ours or bergson's
    single-step document)."""
    path = Path(run_dir) / CONFIG_YAML
    if not path.is_file():
        raise StoreError(f"{path} is missing")
    doc = read_yaml(path)
    steps = doc.get("steps") if isinstance(doc, dict) else None
    if (
        not isinstance(steps, list)
        or not steps
        or not isinstance(steps[0], dict)
        or len(steps[0]) != 1
    ):
        raise StoreError(
            f"{path}: expected a 'steps:' list of one-key '<command>: {{...}}' entries"
        )
    ((command, body),) = steps[0].items()
    return str(command), body or {}, doc.get("metadata") or {}
