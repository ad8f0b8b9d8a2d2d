"""The one table of dtype names: bergson's precision names and torch's spellings.

Every config field that names a dtype (``--precision``, ``--hessian_dtype``,
``--score_precision``) resolves through :func:`torch_dtype`, so a name means the same
thing everywhere and an unknown name gets the same sentence.
"""

from __future__ import annotations

import torch

from ..errors import BadInputError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


QUANTIZED: dict[str, torch.dtype] = {"int4": torch.bfloat16, "int8": torch.bfloat16}
"""``--precision int4|int8`` (bitsandbytes): the dtype of what is not quantized
(embeddings, norms, activations, hence gradient rows). Not in :data:`DTYPES`, so no dtype
is ever *named* int8, and only ``--precision`` (``what="precision"``) accepts them."""


def torch_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """``'fp32'`` -> ``torch.float32``; an unknown name is a :class:`BadInputError`."""
    try:
        return QUANTIZED[name] if what == "precision" and name in QUANTIZED else DTYPES[name]
    except KeyError:
        raise BadInputError(
            f"unknown {what} {name!r}; use one of fp32, fp64, bf16, fp16"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``'fp32'`` (the short name bergson writes)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise BadInputError(f"unsupported dtype {dtype}")
