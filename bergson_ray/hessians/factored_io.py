"""bergson's sharded safetensors layout for factored Hessians (spec §2.3).

One subdirectory per quantity, each holding ``shard_{k}.safetensors`` files that
map module name -> the ``k``-th block of rows of that module's tensor. Rows are
split with :func:`shard_bounds_remainder_first` (shard 0 takes the remainder), so
concatenating the shards in order along dim 0 gives the full tensor whatever their number.
``factor_eig_a`` is the exception: every shard holds the full ``[I']`` vector.

Our ``K`` HessianShard actors each own whole modules; file ``k`` therefore gets
the ``k``-th row block of *every* module, gathered from all actors (see
``actors/hessian_shard.py``). The reader accepts any shard count, ours or
bergson's, and never unpickles anything (``total_processed.pt`` is read with
``weights_only=True``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import StoreError
from ..store.processor import read_total_processed, write_total_processed
from .factored import KroneckerFactors

log = logging.getLogger(__name__)

SUBDIRS: dict[str, str] = {
    "A": "activation_sharded",
    "S": "gradient_sharded",
    "q_a": "eigen_activation_sharded",
    "q_g": "eigen_gradient_sharded",
    "eigenvalues": "eigenvalue_sharded",
    "factor_eig_a": "factor_eig_a",
    "factor_eig_g": "factor_eig_g",
    "correction": "eigenvalue_correction_sharded",
}
"""KroneckerFactors field -> subdirectory name."""
REPLICATED = frozenset({"factor_eig_a"})
REQUIRED = ("q_a", "q_g", "eigenvalues")
INFO_FILE = "hessian_info.json"
_SHARD_RE = re.compile(r"^shard_(\d+)\.safetensors$")

__all__ = [
    "SUBDIRS",
    "is_factored_dir",
    "read_factored",
    "read_total_processed",
    "shard_bounds_remainder_first",
    "shard_slices",
    "write_info",
    "write_shard_file",
    "write_total_processed",
]


def is_factored_dir(path: str | Path) -> bool:
    """bergson's rule: a Hessian dir is factored iff it has ``eigen_activation_sharded/``."""
    return (Path(path) / SUBDIRS["q_a"]).is_dir()


def shard_bounds_remainder_first(dim: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of shard ``rank`` of ``world``; shard 0 takes the remainder."""
    base, rem = divmod(dim, world)
    if rank == 0:
        return 0, base + rem
    start = rem + rank * base
    return start, start + base


def shard_slices(
    factors: Mapping[str, KroneckerFactors], rank: int, world: int
) -> dict[str, dict[str, torch.Tensor]]:
    """``subdir -> {module: rows of shard `rank`}`` for the given modules (copies, CPU)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, kf in factors.items():
        for field, subdir in SUBDIRS.items():
            t = getattr(kf, field)
            if t is None:
                continue
            if field not in REPLICATED:
                lo, hi = shard_bounds_remainder_first(t.shape[0], rank, world)
                t = t[lo:hi]
            out.setdefault(subdir, {})[name] = t.detach().to("cpu").contiguous().clone()
    return out


def write_shard_file(
    root: str | Path, rank: int, parts: Iterable[Mapping[str, Mapping[str, torch.Tensor]]]
) -> list[Path]:
    """Write ``<subdir>/shard_{rank}.safetensors`` from several actors' :func:`shard_slices`."""
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for part in parts:
        for subdir, tensors in part.items():
            dest = merged.setdefault(subdir, {})
            overlap = set(dest) & set(tensors)
            if overlap:
                raise StoreError(f"module(s) {sorted(overlap)} were produced by two shards")
            dest.update(tensors)
    written = []
    for subdir, tensors in merged.items():
        path = Path(root) / subdir / f"shard_{rank}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(dict(sorted(tensors.items())), str(path))
        written.append(path)
    return written


def write_info(root: str | Path, info: Mapping) -> None:
    """Our metadata (method, counts, shapes); bergson ignores it, our reader uses it if present."""
    Path(root, INFO_FILE).write_text(json.dumps(dict(info), indent=2, sort_keys=True) + "\n")


def _shard_files(directory: Path) -> list[Path]:
    found = []
    for p in directory.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    found.sort()
    idx = [i for i, _ in found]
    if idx != list(range(len(found))):
        raise StoreError(
            f"{directory}: shard files must be numbered 0..n-1 without gaps, found {idx}"
        )
    return [p for _, p in found]


def _read_subdir(
    directory: Path, modules: set[str] | None, replicated: bool
) -> dict[str, torch.Tensor]:
    files = _shard_files(directory)
    if not files:
        raise StoreError(f"{directory} has no shard_*.safetensors files")
    if replicated:
        files = files[:1]
    pieces: dict[str, list[torch.Tensor]] = {}
    try:
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = [k for k in f.keys() if modules is None or k in modules]
                for k in keys:
                    pieces.setdefault(k, []).append(f.get_tensor(k))
    except (SafetensorError, OSError) as e:
        raise StoreError(f"cannot read {directory}: {e}") from e
    counts = {k: len(v) for k, v in pieces.items()}
    if len(set(counts.values())) > 1:
        raise StoreError(f"{directory}: modules appear in different numbers of shards: {counts}")
    return {k: torch.cat(v, dim=0) if len(v) > 1 else v[0] for k, v in pieces.items()}


def read_factored(
    root: str | Path,
    *,
    modules: Iterable[str] | None = None,
    with_factors: bool = False,
    strict: bool = True,
) -> dict[str, KroneckerFactors]:
    """Load every (or the named) module's factored Hessian, full tensors on CPU.

    ``with_factors`` also loads the raw ``A``/``S`` sums (not needed to apply H⁻¹).
    ``strict=False`` skips named modules the dir does not have instead of failing.
    """
    root = Path(root)
    if not is_factored_dir(root):
        raise StoreError(
            f"{root} is not a factored Hessian directory (no {SUBDIRS['q_a']}/ inside)"
        )
    wanted = set(modules) if modules is not None else None
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for field, subdir in SUBDIRS.items():
        if field in ("A", "S") and not with_factors:
            continue
        directory = root / subdir
        if not directory.is_dir():
            if field in REQUIRED:
                raise StoreError(f"factored Hessian {root} is missing {subdir}/")
            continue
        loaded[field] = _read_subdir(directory, wanted, field in REPLICATED)
    names = list(loaded["q_a"])
    if strict and wanted is not None and (wanted - set(names)):
        raise StoreError(f"{root} has no factored Hessian for {sorted(wanted - set(names))}")
    out: dict[str, KroneckerFactors] = {}
    for name in names:
        got = {f: loaded[f].get(name) for f in loaded}
        for f in REQUIRED:
            if got.get(f) is None:
                raise StoreError(f"{root}/{SUBDIRS[f]} has no tensor for module {name}")
        o, i = got["q_g"].shape[0], got["q_a"].shape[0]
        if tuple(got["eigenvalues"].shape) != (o, i):
            raise StoreError(
                f"{root}: eigenvalue grid of {name} is {tuple(got['eigenvalues'].shape)}, "
                f"expected ({o}, {i}) from its eigenvectors"
            )
        # Old bergson dirs have no per-factor eigenvalues (only factored_tikhonov needs them).
        out[name] = KroneckerFactors(
            q_a=got["q_a"],
            q_g=got["q_g"],
            eigenvalues=got["eigenvalues"],
            factor_eig_a=got.get("factor_eig_a"),
            factor_eig_g=got.get("factor_eig_g"),
            correction=got.get("correction"),
            A=got.get("A"),
            S=got.get("S"),
        )
    return out
