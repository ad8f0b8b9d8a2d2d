"""``hessian --module_partitions N``: fit the factored Hessian one module group at a time.

Every factor (``A``, ``S``, eigenbases, eigenvalues, EK-FAC corrections) belongs to one
module and is fit from that module's activations and output gradients only, so the
modules can be split into groups fit in separate passes over the data: workers and
shards then hold one group's factors at a time, which bounds memory at the price of
``N`` passes. Groups are contiguous runs of the modules in model order, of near-equal
size (bergson's ``partition_modules``).

Each pass writes bergson's sharded safetensors layout (``factored_io.py``) into its own
``partition_<g>`` directory with the same number of files; :func:`merge_partitions` then
joins file ``r`` of every partition into file ``r`` of the run, so the result is the
run that one partition would have written. No Ray here: names in, files out.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import BadInputError, StoreError
from .factored_io import SUBDIRS

PARTITION_DIR = "partition_{}"
"""Per-group output directory under the run (removed once merged), as bergson names it."""


def partition_modules(names: Sequence[str], num_partitions: int) -> list[list[str]]:
    """``names`` split into ``min(num_partitions, len(names))`` contiguous groups whose
    sizes differ by at most one (the first groups take the remainder)."""
    if num_partitions < 1:
        raise BadInputError(f"--module_partitions must be >= 1, got {num_partitions}")
    names = list(names)
    if not names:
        return []
    k = min(num_partitions, len(names))
    size, extra = divmod(len(names), k)
    groups, start = [], 0
    for g in range(k):
        end = start + size + (1 if g < extra else 0)
        groups.append(names[start:end])
        start = end
    return groups


def partition_dirs(root: str | Path, num_partitions: int) -> list[Path]:
    return [Path(root) / PARTITION_DIR.format(g) for g in range(num_partitions)]


def _read(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise StoreError(f"cannot read {path}: {e}") from e


def merge_partitions(root: str | Path, parts: Sequence[str | Path]) -> list[Path]:
    """Join ``<part>/<subdir>/shard_<r>.safetensors`` of every partition into
    ``<root>/<subdir>/shard_<r>.safetensors`` (keys sorted, as one fit writes them),
    then remove the partition directories. Returns the files written.

    Every partition must hold the same files: a factor present in one group and not in
    another means a partition failed, and nothing partial is merged.
    """
    root, parts = Path(root), [Path(p) for p in parts]
    written: list[Path] = []
    for subdir in SUBDIRS.values():
        listed = [
            sorted(p.name for p in (d / subdir).glob("shard_*.safetensors"))
            if (d / subdir).is_dir()
            else []
            for d in parts
        ]
        if not any(listed):
            continue
        if any(names != listed[0] for names in listed):
            raise StoreError(
                f"module partitions disagree on {subdir}/ files ({listed}); nothing was merged"
            )
        for name in listed[0]:
            merged: dict = {}
            for d in parts:
                tensors = _read(d / subdir / name)
                overlap = set(merged) & set(tensors)
                if overlap:
                    raise StoreError(f"module(s) {sorted(overlap)} were fit in two partitions")
                merged.update(tensors)
            dest = root / subdir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            save_file(dict(sorted(merged.items())), str(dest))
            written.append(dest)
    for d in parts:
        shutil.rmtree(d, ignore_errors=True)
    return written
