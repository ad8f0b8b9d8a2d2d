"""Everything the query side must know about a gradient store, read once.

A query is only comparable with a store's rows if it is made the same way: same model,
modules, projection, loss, normalizers and build-time preprocessing. All of that is in
the store's ``config.yaml`` (ours: a ``build`` step; bergson's: ``index_cfg`` and
``preprocess_cfg``), which :func:`open_store_spec` reads next to the store itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import BuildConfig
from ..errors import StoreError
from ..store.files import read_yaml
from .transform import BuildPreprocess

log = logging.getLogger(__name__)


@dataclass
class StoreSpec:
    path: Path
    store: Any
    """The opened :class:`~bergson_ray.store.gradient_store.GradientStore`."""
    build: BuildConfig | None
    """The build's config (None when the store has no readable ``config.yaml``)."""
    preprocess: BuildPreprocess

    @property
    def grad_sizes(self) -> dict[str, int]:
        return dict(self.store.grad_sizes)

    @property
    def dim(self) -> int:
        return int(sum(self.store.grad_sizes.values()))

    @property
    def num_rows(self) -> int:
        return int(self.store.num_grads)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    doc = read_yaml(path)
    return doc if isinstance(doc, dict) else {}


def _build_config(doc: dict[str, Any], path: Path) -> BuildConfig | None:
    """Our ``steps: [{build: {...}}]`` document (any step whose body is a BuildConfig)."""
    from ..store.config_yaml import load_step_config

    if not doc.get("steps"):
        return None
    try:
        return load_step_config(path, BuildConfig)
    except (StoreError, ValueError, TypeError) as err:
        log.warning("cannot read the build settings in %s/config.yaml: %s", path, err)
        return None


def open_store_spec(path: str | Path) -> StoreSpec:
    """Open the store at ``path`` and its build settings; :class:`StoreError` if unusable."""
    from ..store.gradient_store import GradientStore

    path = Path(path).expanduser()
    store = GradientStore.open(path)
    doc = _read_yaml(path / "config.yaml")
    build = _build_config(doc, path)
    if build is not None:
        preprocess = BuildPreprocess.from_config(vars(build.preprocess))
    else:
        # bergson writes its preprocess settings under preprocess_cfg.
        preprocess = BuildPreprocess.from_config(doc.get("preprocess_cfg"))
    return StoreSpec(path=path, store=store, build=build, preprocess=preprocess)
