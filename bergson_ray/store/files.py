"""What the gradient and score stores share: memory maps, sparse pre-sized files, atomic
JSON, per-token offsets and index checks."""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bergson_ray.errors import BadInputError, StoreError

INFO_JSON = "info.json"
OFFSETS_NPY = "offsets.npy"


def open_memmap(path: Path, dtype: np.dtype, shape: tuple[int, ...], mode: str) -> np.ndarray:
    """``np.memmap`` that also handles empty files (mmap cannot map zero bytes)."""
    if math.prod(shape) * dtype.itemsize == 0:
        arr = np.zeros(shape, dtype=dtype)
        arr.flags.writeable = mode != "r"
        return arr
    return np.memmap(path, dtype=dtype, mode=mode, shape=shape)


def human_bytes(n: float) -> str:
    """``1.5e12`` -> ``'1.4 TiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_room(directory: Path, nbytes: int, what: str) -> None:
    """Refuse, before anything is written, a file that cannot fit on ``directory``'s disk.

    Stores are pre-sized sparse files, so without this a too-large store is created at
    once and fails much later (or at the first row) with an OS error far from the cause.
    """
    import shutil

    from ..errors import BadInputError

    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if nbytes > free:
        raise BadInputError(
            f"{what} would take {human_bytes(nbytes)}, but {probe} has only "
            f"{human_bytes(free)} free; lower --projection_dim, filter modules or use a bigger disk"
        )


def presize(path: Path, nbytes: int) -> None:
    """Create ``path`` with ``nbytes`` zero bytes without writing them (sparse file)."""
    with open(path, "wb") as f:
        f.truncate(nbytes)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a JSON file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, missing: str) -> Any:
    """Parsed JSON file; :class:`StoreError` saying ``missing`` when it is absent, or
    naming the file when it does not parse."""
    if not path.is_file():
        raise StoreError(f"{path} is missing: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is not valid JSON: {e}") from e


def read_yaml(path: Path) -> Any:
    """Parsed YAML file (``yaml.safe_load``); :class:`StoreError` naming it if it does not
    parse. Callers decide what a missing file means."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise StoreError(f"{path} is not valid YAML: {e}") from e


def find_key(doc: Any, key: str) -> Any:
    """``key``'s value in nested dicts and lists (a parsed YAML/JSON config), breadth
    first so the shallowest occurrence wins; None where it is absent."""
    queue: deque[Any] = deque([doc])
    while queue:
        cur = queue.popleft()
        if isinstance(cur, dict):
            if key in cur:
                return cur[key]
            queue.extend(cur.values())
        elif isinstance(cur, list):
            queue.extend(cur)
    return None


def load_offsets(path: Path, num_items: int, num_grads: int) -> np.ndarray:
    """A per-token store's ``offsets.npy``, checked against ``info.json``'s counts."""
    if not path.is_file():
        raise StoreError(f"{path} is missing: info.json marks this as a per-token store")
    try:
        offsets = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise StoreError(f"cannot read {path} as a .npy array: {e}") from e
    check_offsets(offsets, num_items, where=str(path))
    if int(offsets[-1]) != num_grads:
        raise StoreError(
            f"{path} ends at {int(offsets[-1])} rows but info.json says num_grads={num_grads}"
        )
    return offsets.astype(np.int64, copy=False)


def check_offsets(offsets: np.ndarray, num_items: int, *, where: str = "offsets") -> None:
    """Per-token offsets: int [num_items + 1], starting at 0, never decreasing."""
    if offsets.ndim != 1 or len(offsets) != num_items + 1:
        raise StoreError(
            f"{where}: expected shape [{num_items + 1}] (num_items + 1), found {list(offsets.shape)}"
        )
    if not np.issubdtype(offsets.dtype, np.integer):
        raise StoreError(f"{where}: expected integer offsets, found {offsets.dtype}")
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise StoreError(f"{where}: offsets must start at 0 and never decrease")


def check_indices(
    values: np.ndarray | Sequence[int] | torch.Tensor, upper: int, what: str, where: Path | str
) -> np.ndarray:
    """``values`` as a 1-D int64 array of indices in ``[0, upper)``, or a clear error."""
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    idx = np.asarray(values)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise BadInputError(
            f"{what} indices must be a 1-D integer array, got {idx.dtype}{list(idx.shape)}"
        )
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= upper):
        raise BadInputError(
            f"{what} index out of range [0, {upper}): min {idx.min()}, max {idx.max()} "
            f"(store {where})"
        )
    return idx


def offsets_from_counts(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """``[0, c0, c0+c1, ...]`` as int64: the per-token offsets for row counts per item."""
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def load_tensors_only(path: Path) -> Any:
    """``torch.load`` that can never execute code from the file (bergson's ``.pt``/``.pth``).

    A pickle that would need code to load is refused with one sentence saying so, not
    torch's page-long explanation.
    """
    import pickle

    import torch

    from ..errors import StoreError

    try:
        # eigh's result type is a plain tuple of tensors; allowing it costs no safety and
        # accepts files where someone saved torch.linalg.eigh(...) without unpacking it.
        with torch.serialization.safe_globals([torch.return_types.linalg_eigh]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise StoreError(
                f"{path} is a pickle with code in it; bergson_ray reads only safetensors or "
                "weights-only tensor files (save tensors, dicts and numbers, or use safetensors)"
            ) from None
        raise StoreError(f"{path} is not a readable torch file (not a tensor pickle)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StoreError(f"{path} is not a readable torch file: {first}") from None
