"""Read back the ``config.yaml`` a run wrote, so a store's settings can be replayed.

The query side uses this to rebuild the exact engine (model, projection, loss,
normalizers) that produced a store's rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml

from .cli.args import from_dict
from .errors import StoreError

T = TypeVar("T")


def load_step_config(run_path: str | Path, cls: type[T], command: str | None = None) -> T:
    """The config dataclass of the (first matching) step in ``<run_path>/config.yaml``."""
    path = Path(run_path) / "config.yaml"
    if not path.is_file():
        raise StoreError(f"{path} is missing: cannot tell how {run_path} was built")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise StoreError(f"{path} is not valid YAML: {err}") from err
    steps = doc.get("steps") or []
    for step in steps:
        for name, body in step.items():
            if command is None or name == command:
                fields = getattr(cls, "__dataclass_fields__", {})
                return from_dict(cls, {k: v for k, v in (body or {}).items() if k in fields})
    raise StoreError(f"{path} holds no {command or 'step'} configuration")
