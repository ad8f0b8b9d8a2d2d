"""Checks a command can make in well under a second, before torch, transformers or Ray
are imported: every local path a config names must exist.

The pipelines check the same things again (the Python API does not come through here);
this module only makes the CLI's most common mistakes cost a second instead of the
several seconds of imports and start-up that come before a pipeline's own checks.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

from ..data.loading import looks_local
from ..errors import BadInputError

MUST_EXIST = ("query_path", "hessian_path", "optimizer_state", "scores", "manifest", "paths")
"""Path fields that, when set, must name something that exists."""


def _leaves(cfg: Any, prefix: str = ""):
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.name, value


def _exists(path: str) -> bool:
    expanded = os.path.expanduser(path)
    if glob.has_magic(expanded):
        return bool(glob.glob(expanded))
    return os.path.exists(expanded)


def check_paths(cfg: Any) -> None:
    """One :class:`BadInputError` naming the first local path in ``cfg`` that is missing."""
    for dotted, name, value in _leaves(cfg):
        flag = "--" + (dotted if dotted.startswith("query.") else name)
        values = value if isinstance(value, list) else [value]
        for item in values:
            if not isinstance(item, str) or not item or item == "tiny" or "://" in item:
                continue
            if name in ("dataset",) and looks_local(item) and not _exists(item):
                raise BadInputError(f"{flag} {item!r} does not exist")
            if name in ("model", "tokenizer") and item.startswith(("/", "./", "../", "~")):
                if not _exists(item):
                    raise BadInputError(f"{flag} {item!r} does not exist")
            if name in MUST_EXIST and not _exists(item):
                raise BadInputError(f"{flag} {item!r} does not exist")
