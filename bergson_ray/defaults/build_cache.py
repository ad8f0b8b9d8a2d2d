"""Build-once caching of locally built assets.

A build writes into a temporary directory next to its final place, writes
``manifest.json`` last and renames the directory into place, all under an ``fcntl`` file
lock, so concurrent callers (pytest workers, Ray actors) build once and never see half a
build.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "BERGSON_RAY_CACHE"


def cache_base(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory that holds the tiny builds: argument, ``$BERGSON_RAY_CACHE``, or
    ``~/.cache/bergson_ray``."""
    base = cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/bergson_ray"
    return Path(os.path.expanduser(str(base))).resolve()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock; released automatically if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_once(final: Path, build: Callable[[Path], None]) -> None:
    """Run ``build(tmp_dir)`` unless ``final/manifest.json`` exists; publish atomically.

    ``build`` must write ``manifest.json`` last. The temp dir lives next to ``final`` so
    the closing ``rename`` is atomic on one filesystem.
    """
    if (final / "manifest.json").exists():
        return
    with file_lock(final.parent / f".{final.name}.lock"):
        if (final / "manifest.json").exists():  # another process finished meanwhile
            return
        # Holding the lock, any temp dir is a leftover of a killed builder: drop it.
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            with quiet_progress():
                build(tmp)
            if not (tmp / "manifest.json").exists():
                raise RuntimeError(f"tiny build into {tmp} wrote no manifest.json")
            if final.exists():  # a manifest-less leftover: never complete, safe to drop
                shutil.rmtree(final)
            os.rename(tmp, final)
            log.info("tiny assets ready at %s", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide datasets/transformers progress bars while building (restored afterwards):
    a build may run inside a Ray worker or a test, where bars are only noise."""
    import datasets
    from transformers.utils import logging as hf_logging

    ds_on = datasets.is_progress_bar_enabled()
    hf_on = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if ds_on:
            datasets.enable_progress_bars()
        if hf_on:
            hf_logging.enable_progress_bar()


def write_manifest(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
