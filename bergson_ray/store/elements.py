"""Element dtypes of the on-disk formats: bergson's names, our memmap storage, torch's view.

bfloat16: numpy has no bf16 and we do not depend on ``ml_dtypes``, so bf16 elements
live in memory maps as ``uint16`` bit patterns and become tensors through
``torch.Tensor.view(torch.bfloat16)``. The bytes on disk are exactly bergson's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bergson_ray.errors import BadInputError
from bergson_ray.utils.dtypes import DTYPES


@dataclass(frozen=True)
class ElementType:
    """One element dtype as bergson names it, as we store it, and as torch sees it."""

    name: str
    """bergson's spelling (``np.dtype(...).name`` with ml_dtypes): float32, bfloat16, ..."""
    storage: np.dtype
    """What our memory maps hold: the float dtype itself, or ``<u2`` for bfloat16."""
    torch_dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    @property
    def is_bf16(self) -> bool:
        return self.torch_dtype == torch.bfloat16


_ELEMENTS = {
    "float32": ElementType("float32", np.dtype("<f4"), torch.float32),
    "float16": ElementType("float16", np.dtype("<f2"), torch.float16),
    "bfloat16": ElementType("bfloat16", np.dtype("<u2"), torch.bfloat16),
    "float64": ElementType("float64", np.dtype("<f8"), torch.float64),
}
_TORCH_TO_NAME = {e.torch_dtype: name for name, e in _ELEMENTS.items()}
_NUMPY_ALIASES = {
    "f4": "float32", "<f4": "float32", "float": "float32",
    "f2": "float16", "<f2": "float16", "half": "float16",
    "f8": "float64", "<f8": "float64", "double": "float64",
}  # fmt: skip
"""numpy's spellings; the precision names (fp32, bf16, ...) come from ``utils.dtypes``."""


def _name_of(key: str) -> str | None:
    if key in _ELEMENTS:
        return key
    if key in _NUMPY_ALIASES:
        return _NUMPY_ALIASES[key]
    dtype = DTYPES.get(key)
    return None if dtype is None else _TORCH_TO_NAME.get(dtype)


def element_type(spec: str | torch.dtype | np.dtype | ElementType) -> ElementType:
    """Resolve a dtype given as bergson/numpy/torch name, torch or numpy dtype.

    Raises :class:`BadInputError` for anything that is not one of the four float types.
    """
    if isinstance(spec, ElementType):
        return spec
    if isinstance(spec, torch.dtype):
        name = _TORCH_TO_NAME.get(spec)
    elif isinstance(spec, np.dtype):
        name = spec.name if spec.name in _ELEMENTS else _NUMPY_ALIASES.get(spec.str.lower())
    else:
        name = _name_of(str(spec).strip().lower().removeprefix("torch."))
    if name is None:
        raise BadInputError(
            f"unsupported element dtype {spec!r}; expected one of {sorted(_ELEMENTS)}"
        )
    return _ELEMENTS[name]


def to_storage(values: np.ndarray | torch.Tensor, et: ElementType) -> np.ndarray:
    """Cast ``values`` to ``et`` and return the array our memory maps hold."""
    if isinstance(values, torch.Tensor):
        t = values.detach().to(device="cpu", dtype=et.torch_dtype)
        if et.is_bf16:
            return t.contiguous().view(torch.int16).numpy().view(et.storage)
        return t.numpy()
    arr = np.asarray(values)
    if et.is_bf16:
        if not np.issubdtype(arr.dtype, np.floating):
            raise BadInputError(
                f"bfloat16 values must be given as floats (or a torch tensor), got {arr.dtype}"
            )
        return to_storage(torch.from_numpy(np.ascontiguousarray(arr)), et)
    return arr.astype(et.storage, copy=False)


def to_float32(stored: np.ndarray, et: ElementType) -> torch.Tensor:
    """Copy stored elements (possibly a memmap view) into a fresh float32 tensor."""
    arr = np.array(stored, copy=True, order="C")
    if et.is_bf16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(arr).float()
