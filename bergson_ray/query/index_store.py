"""Saved FAISS indexes next to a gradient store, and when they may be reused.

Layout (bergson's naming, spec §2.6, with a real JSON config)::

    <store>/faiss_<factory , -> _>[_cosine][_precondition]/
        config.json                 build settings, module layout, store fingerprint
        rows_<start>-<stop>.faiss   one CPU-form index per shard (faiss.write_index)

Shard files are named by their row range rather than bergson's ``0.faiss, 1.faiss``:
a 1-shard and a 3-shard service of the same store then share the directory without
invalidating each other, and a restarted shard always finds its own file.

A saved index is reused only when every build setting (:data:`config.BUILD_FIELDS`) and
the store fingerprint (rows, dim, size and mtime of ``gradients.bin``) match, so a
rebuilt or resumed store never serves stale rows. Only :meth:`IndexDir.prepare` (called
once by whoever starts a service or an Attributor) may reset a directory; shard builders
merely fill in missing shard files, so a restarted actor never clobbers a directory that
a newer service re-prepared with other settings (it builds in memory instead).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss

from ..config import BUILD_FIELDS, FaissConfig
from .faiss_index import (
    build_shard,
    factory_slug,
    load_index,
    resolve_device,
    save_index,
    shard_bounds_remainder_last,
    to_gpu,
)
from .rows import RowMatrix
from .transform import RowTransform

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"


def index_dir_name(cfg: FaissConfig) -> str:
    name = f"faiss_{factory_slug(cfg.index_factory)}"
    if cfg.unit_norm:
        name += "_cosine"
    if cfg.hessian_path:
        name += "_precondition"
    return name


def store_fingerprint(store_path: str | Path, num_rows: int, dim: int) -> dict[str, Any]:
    """What identifies the store's rows; a change means a saved index is stale."""
    grads = Path(store_path) / "gradients.bin"
    st = grads.stat() if grads.exists() else None
    return {
        "num_rows": int(num_rows),
        "dim": int(dim),
        "bytes": st.st_size if st else None,
        "mtime_ns": st.st_mtime_ns if st else None,
    }


def build_settings(cfg: FaissConfig) -> dict[str, Any]:
    d = asdict(cfg)
    out = {k: d[k] for k in BUILD_FIELDS}
    if out["hessian_path"]:
        out["hessian_path"] = str(Path(out["hessian_path"]).resolve())
    else:
        out.pop("damping_factor")  # irrelevant without a Hessian
        out.pop("inversion")
    return out


class IndexDir:
    """One saved-index directory for one (store, build settings) pair."""

    def __init__(
        self,
        store_path: str | Path,
        cfg: FaissConfig,
        *,
        num_rows: int,
        dim: int,
        grad_sizes: dict[str, int],
    ):
        self.store_path = Path(store_path)
        self.cfg = cfg
        self.path = self.store_path / index_dir_name(cfg)
        self.bounds = shard_bounds_remainder_last(num_rows, cfg.num_shards)
        self.expected = {
            "format_version": FORMAT_VERSION,
            "build": build_settings(cfg),
            "store": store_fingerprint(store_path, num_rows, dim),
            "ordered_modules": list(grad_sizes),
            "grad_sizes": dict(grad_sizes),
            "gradients_path": str(self.store_path.resolve()),
            "unit_norm": cfg.unit_norm,
        }

    def shard_path(self, i: int) -> Path:
        start, stop = self.bounds[i]
        return self.path / f"rows_{start}-{stop}.faiss"

    def saved_config(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.path / CONFIG_NAME).read_text())
        except (OSError, ValueError):
            return None

    def _matches(self, saved: dict[str, Any] | None) -> bool:
        if not saved:
            return False
        keys = ("format_version", "build", "store", "grad_sizes")
        return all(saved.get(k) == self.expected[k] for k in keys)

    def is_current(self) -> bool:
        """True when the saved config describes exactly this store and these settings."""
        return self._matches(self.saved_config())

    def has_shard(self, i: int) -> bool:
        return self.is_current() and self.shard_path(i).exists()

    def is_complete(self) -> bool:
        return self.is_current() and all(
            self.shard_path(i).exists() for i in range(len(self.bounds))
        )

    def prepare(self) -> bool:
        """Make the directory describe these settings; stale shards are deleted.

        Returns False when the store's directory is not writable (the index is then
        built in memory and not saved).
        """
        if self.is_current():
            return True
        try:
            if self.path.exists():
                log.info("saved index %s is stale or built differently; rebuilding", self.path)
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
            tmp = self.path / f".{CONFIG_NAME}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(self.expected, indent=2))
            os.replace(tmp, self.path / CONFIG_NAME)
        except OSError as err:
            log.warning(
                "cannot save the index next to the store (%s); it lives in memory only", err
            )
            return False
        return True


def open_shard(
    index_dir: IndexDir,
    i: int,
    source: RowMatrix,
    transform: RowTransform,
    *,
    saveable: bool = True,
) -> faiss.Index:
    """Shard ``i`` of ``index_dir``: loaded from disk when saved, else built (and saved).

    A shard file that cannot be read (truncated by a crash) is rebuilt. The result is
    on the configured device, memory-mapped when ``mmap_index`` and saving are on.
    """
    cfg = index_dir.cfg
    device = resolve_device(cfg.device)
    path = index_dir.shard_path(i)
    if cfg.save and index_dir.has_shard(i):
        try:
            index = load_index(path, mmap=cfg.mmap_index, device=device)
            log.info("loaded saved index shard %s (%d rows)", path, index.ntotal)
            return index
        except RuntimeError as err:
            log.warning("saved shard %s is unreadable (%s); rebuilding it", path, err)
    start, stop = index_dir.bounds[i]
    index = build_shard(
        source,
        start,
        stop,
        factory=cfg.index_factory,
        transform=transform,
        max_train_examples=cfg.max_train_examples,
        batch_size=cfg.batch_size,
        device=device,
    )
    if cfg.save and saveable and index_dir.is_current():
        try:
            save_index(index, path)
            log.info("saved index shard %s", path)
            if cfg.mmap_index and device == "cpu":
                del index
                return load_index(path, mmap=True)
        except OSError as err:
            log.warning("cannot save index shard %s: %s", path, err)
    return to_gpu(index) if device == "cuda" else index
