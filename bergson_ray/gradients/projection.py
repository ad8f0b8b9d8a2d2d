"""Seeded random projection matrices, reproducible across devices and libraries.

The seed of a matrix is derived from a string identifier (``"<module>/left"``),
exactly as bergson derives it, so a store we build with the same settings holds
the same numbers as bergson's. Rademacher matrices are generated from numpy's
PCG64 on the CPU, hence identical on every device; Gaussian ones come from a
torch generator on the target device (as in bergson, device-dependent).
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import numpy as np
import torch

_MOD = 2**63 - 1


def projection_seed(identifier: str) -> int:
    digest = hashlib.md5(identifier.encode("utf-8")).digest()
    return int.from_bytes(digest, "big") % _MOD


@lru_cache(maxsize=64)
def _rademacher_cpu(identifier: str, m: int, n: int) -> torch.Tensor:
    rng = np.random.Generator(np.random.PCG64(projection_seed(identifier)))
    raw = rng.bytes(math.ceil(m * n / 8))
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[: m * n]
    signs = bits.astype(np.float32) * 2.0 - 1.0
    return torch.from_numpy(signs.reshape(m, n))


def projection_matrix(
    identifier: str,
    m: int,
    n: int,
    *,
    kind: str = "rademacher",
    scale: str = "jl",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """An ``[m, n]`` projection. ``jl`` scaling makes ``E[PᵀP] = I`` (unbiased inner products)."""
    if kind == "rademacher":
        mat = _rademacher_cpu(identifier, m, n).to(device=device, dtype=dtype)
    elif kind == "normal":
        gen = torch.Generator(device=device).manual_seed(projection_seed(identifier))
        mat = torch.randn(m, n, generator=gen, device=device, dtype=dtype)
    else:
        raise ValueError(f"unknown projection_type {kind!r} (rademacher or normal)")
    if scale == "jl":
        mat = mat / math.sqrt(m)
    elif scale == "row_norm":
        mat = mat / mat.norm(dim=1, keepdim=True)
    else:
        raise ValueError(f"unknown projection_scale {scale!r} (jl or row_norm)")
    return mat


class ProjectionCache:
    """Per-engine cache so each matrix is generated once per (identifier, device, dtype)."""

    def __init__(self, kind: str, scale: str):
        self.kind, self.scale = kind, scale
        self._cache: dict[tuple, torch.Tensor] = {}

    def get(self, identifier: str, m: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
        key = (identifier, m, n, dtype, str(device))
        mat = self._cache.get(key)
        if mat is None:
            mat = projection_matrix(
                identifier, m, n, kind=self.kind, scale=self.scale, dtype=dtype, device=device
            )
            self._cache[key] = mat
        return mat
