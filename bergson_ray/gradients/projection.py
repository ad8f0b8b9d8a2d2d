"""Seeded random projection matrices, reproducible across devices and libraries.

Every matrix is named by a string identifier (``"<module>/left"``, optionally
``"<module>/left/seed<n>"``) and derived from it exactly as bergson derives it, so a
store we build with the same settings holds the same numbers as bergson's. bergson
numbers its generators ("projection versions"); ``processor_config.yaml`` records
which one made a store, and stores of different versions must never be mixed.

Version 2 (bergson >= 2.5, our default)
    A counter-based generator, Philox4x32-10 (Salmon et al., SC'11). The two key
    words are the first two little-endian 32-bit words of ``md5(identifier)``; the
    counter of entry ``(r, c)`` is ``(c // k, r, 0, 0)``, so each entry is a pure
    function of (identifier, row, column): the matrix does not depend on the device,
    on how generation is split up, or even on the shape (``A[:k, :l]`` is the
    ``[k, l]`` matrix of the same identifier).

    * ``rademacher`` (``k = 128``): entry ``c`` takes bit ``c % 128`` of the 128-bit
      output (word ``b // 32``, bit ``b % 32`` counted from the least significant);
      a set bit is ``+1``, a clear one ``-1``. Bit-identical everywhere.
    * ``normal`` (``k = 4``): Box-Muller on the word pairs ``(x0, x1)`` and
      ``(x2, x3)``: ``u1 = (f32(a) + 0.5) / 2**32``, ``u2 = f32(b) / 2**32``,
      ``ρ = sqrt(-2 ln u1)``, ``θ = f32(2π) · u2``; columns ``4w, 4w+1`` are
      ``ρ cos θ, ρ sin θ`` of the first pair and ``4w+2, 4w+3`` of the second. We
      evaluate ``ln``, ``sqrt``, ``cos`` and ``sin`` in float64 and round once to
      float32, i.e. (almost always) the correctly rounded value; float32 libraries
      (bergson's numpy path, CUDA's ``logf``/``sinf``) may differ from it in the
      last bit or two.
    * Global projections (``projection_target=global``) generate the
      ``[p, numel]`` matrix in column blocks of ``2**27 // p`` columns, block
      ``j`` named ``"<identifier>/<first column of block j>"``.

Version 1 (bergson < 2.5, bergson-spec §3.3)
    Seed ``int(md5(identifier), big-endian) mod (2**63 - 1)``. ``rademacher``: numpy
    ``PCG64`` bytes, unpacked most significant bit first (device independent);
    ``normal``: ``torch.randn`` with a generator on the target device (device
    dependent, as in bergson).

Scaling (both versions): ``jl`` divides by ``sqrt(m)`` so ``E[PᵀP] = I`` (inner
products are unbiased); ``row_norm`` makes every row unit length.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import numpy as np
import torch

from ..errors import BadInputError

PROJECTION_VERSIONS = (1, 2)
DEFAULT_PROJECTION_VERSION = 2
"""What we generate unless told otherwise: bergson 2.5's matrices."""

GLOBAL_BLOCK_NUMEL = 1 << 27
"""Version 2 global projections are generated in column blocks of this many entries
(``GLOBAL_BLOCK_NUMEL // p`` columns); each block has its own identifier."""

_MOD = 2**63 - 1

# Philox4x32 constants: round multipliers and the Weyl sequence that bumps the key.
_MUL_A, _MUL_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_BUMP_A, _BUMP_B = 0x9E3779B9, 0xBB67AE85
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_ROUNDS = 10

_CHUNK = 1 << 20
"""Entries generated per numpy step: bounds the uint64/float64 temporaries (tens of MB)."""


# ---------------------------------------------------------------------------- identifiers


def projection_identifier(name: str, role: str, seed: int | None = None) -> str:
    """``"<name>/<role>"`` plus ``"/seed<n>"`` when a projection seed is set (bergson's names)."""
    ident = f"{name}/{role}"
    return ident if seed is None else f"{ident}/seed{int(seed)}"


def projection_seed(identifier: str) -> int:
    """Version 1 seed of ``identifier``."""
    digest = hashlib.md5(identifier.encode("utf-8")).digest()
    return int.from_bytes(digest, "big") % _MOD


def philox_key(identifier: str) -> tuple[int, int]:
    """Version 2 Philox key of ``identifier``: md5 bytes 0-3 and 4-7 as little-endian words."""
    digest = hashlib.md5(identifier.encode("utf-8")).digest()
    return int.from_bytes(digest[0:4], "little"), int.from_bytes(digest[4:8], "little")


def check_version(version: int) -> int:
    if version not in PROJECTION_VERSIONS:
        raise BadInputError(
            f"unknown projection_version {version!r}; supported: {list(PROJECTION_VERSIONS)}"
        )
    return int(version)


# ---------------------------------------------------------------------------- Philox4x32-10


def philox4x32_10(counter, key: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 of the four 32-bit counter words (arrays that broadcast together)
    under the two-word ``key``; returns the four output words as ``uint32`` arrays.

    Words are carried in ``uint64`` so the 32x32 -> 64 bit products are exact; the high
    and low halves of each product are then split off with a shift and a mask.
    """
    x0, x1, x2, x3 = (np.asarray(c).astype(np.uint64) for c in counter)
    ka, kb = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for rnd in range(_ROUNDS):
        if rnd:
            ka = (ka + _BUMP_A) & 0xFFFFFFFF
            kb = (kb + _BUMP_B) & 0xFFFFFFFF
        prod_a = x0 * _MUL_A
        prod_b = x2 * _MUL_B
        x0, x1, x2, x3 = (
            (prod_b >> _SHIFT32) ^ x1 ^ np.uint64(ka),
            prod_b & _LOW32,
            (prod_a >> _SHIFT32) ^ x3 ^ np.uint64(kb),
            prod_a & _LOW32,
        )
    return tuple(x.astype(np.uint32) for x in np.broadcast_arrays(x0, x1, x2, x3))


def _blocks(rows: np.ndarray, w0: int, w1: int, key: tuple[int, int]) -> np.ndarray:
    """Philox outputs for counters ``(w, r, 0, 0)``, ``r`` in ``rows``, ``w`` in
    ``[w0, w1)``: ``uint32 [len(rows), w1 - w0, 4]``."""
    words = np.arange(w0, w1, dtype=np.uint64)[None, :]
    out = philox4x32_10((words, rows[:, None], 0, 0), key)
    return np.stack(out, axis=-1)


_BIT_SHIFTS = np.arange(32, dtype=np.uint32)


def _signs_block(blocks: np.ndarray) -> np.ndarray:
    """``[R, W, 4]`` Philox outputs -> ``[R, 128 W]`` of ±1 (bit b of each output:
    word ``b // 32``, bit ``b % 32`` from the least significant)."""
    bits = (blocks[..., None] >> _BIT_SHIFTS) & np.uint32(1)  # [R, W, 4, 32]
    bits = bits.reshape(blocks.shape[0], -1).astype(np.float32)
    return bits * np.float32(2.0) - np.float32(1.0)


_TWO_PI_F32 = np.float32(2.0 * math.pi)
_INV_2_32 = np.float32(2.0**-32)


def _normals_block(blocks: np.ndarray) -> np.ndarray:
    """``[R, W, 4]`` Philox outputs -> ``[R, 4 W]`` standard normals (Box-Muller)."""
    out = np.empty(blocks.shape, dtype=np.float32)
    for first, (a_col, b_col) in enumerate(((0, 1), (2, 3))):
        # the uniforms are formed in float32 exactly as bergson forms them; the rest is float64
        u1 = (blocks[..., a_col].astype(np.float32) + np.float32(0.5)) * _INV_2_32
        u2 = blocks[..., b_col].astype(np.float32) * _INV_2_32
        theta = (_TWO_PI_F32 * u2).astype(np.float64)
        rho = np.sqrt(-2.0 * np.log(u1.astype(np.float64)))
        out[..., 2 * first] = rho * np.cos(theta)
        out[..., 2 * first + 1] = rho * np.sin(theta)
    return out.reshape(blocks.shape[0], -1)


_PER_WORD = {"rademacher": 128, "normal": 4}
_FILL = {"rademacher": _signs_block, "normal": _normals_block}


def philox_matrix(identifier: str, m: int, n: int, kind: str = "rademacher") -> np.ndarray:
    """The unscaled version 2 ``[m, n]`` matrix (``float32``, on the CPU)."""
    if kind not in _PER_WORD:
        raise ValueError(f"unknown projection_type {kind!r} (rademacher or normal)")
    if max(m, n) >= 1 << 31:
        raise ValueError(
            f"projection matrices are limited to 2**31 rows and columns, got [{m}, {n}]"
        )
    key = philox_key(identifier)
    per, fill = _PER_WORD[kind], _FILL[kind]
    out = np.empty((m, n), dtype=np.float32)
    n_words = -(-n // per)
    # a chunk is a rectangle of whole Philox outputs: rows x word range
    words_per = max(1, min(n_words, _CHUNK // per))
    rows_per = max(1, _CHUNK // (words_per * per))
    for r0 in range(0, m, rows_per):
        rows = np.arange(r0, min(m, r0 + rows_per), dtype=np.uint64)
        for w0 in range(0, n_words, words_per):
            w1 = min(n_words, w0 + words_per)
            c0, c1 = w0 * per, min(n, w1 * per)
            out[r0 : r0 + len(rows), c0:c1] = fill(_blocks(rows, w0, w1, key))[:, : c1 - c0]
    return out


# ---------------------------------------------------------------------------- version 1


@lru_cache(maxsize=64)
def _rademacher_cpu(identifier: str, m: int, n: int) -> torch.Tensor:
    rng = np.random.Generator(np.random.PCG64(projection_seed(identifier)))
    raw = rng.bytes(math.ceil(m * n / 8))
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[: m * n]
    signs = bits.astype(np.float32) * 2.0 - 1.0
    return torch.from_numpy(signs.reshape(m, n))


def _v1_matrix(identifier, m, n, kind, dtype, device) -> torch.Tensor:
    if kind == "rademacher":
        return _rademacher_cpu(identifier, m, n).to(device=device, dtype=dtype)
    if kind == "normal":
        gen = torch.Generator(device=device).manual_seed(projection_seed(identifier))
        return torch.randn(m, n, generator=gen, device=device, dtype=dtype)
    raise ValueError(f"unknown projection_type {kind!r} (rademacher or normal)")


# ---------------------------------------------------------------------------- public API


def _scaled(mat: torch.Tensor, m: int, scale: str) -> torch.Tensor:
    if scale == "jl":
        return mat / math.sqrt(m)
    if scale == "row_norm":
        return mat / mat.norm(dim=1, keepdim=True)
    raise ValueError(f"unknown projection_scale {scale!r} (jl or row_norm)")


def random_matrix(
    identifier: str,
    m: int,
    n: int,
    *,
    kind: str = "rademacher",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    version: int = DEFAULT_PROJECTION_VERSION,
) -> torch.Tensor:
    """The unscaled ``[m, n]`` matrix of ±1 or standard normal entries named ``identifier``."""
    if check_version(version) == 1:
        return _v1_matrix(identifier, m, n, kind, dtype, device)
    return torch.from_numpy(philox_matrix(identifier, m, n, kind)).to(device=device, dtype=dtype)


def projection_matrix(
    identifier: str,
    m: int,
    n: int,
    *,
    kind: str = "rademacher",
    scale: str = "jl",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    version: int = DEFAULT_PROJECTION_VERSION,
) -> torch.Tensor:
    """An ``[m, n]`` projection. ``jl`` scaling makes ``E[PᵀP] = I`` (unbiased inner products)."""
    mat = random_matrix(identifier, m, n, kind=kind, dtype=dtype, device=device, version=version)
    return _scaled(mat, m, scale)


def global_projection_matrix(
    identifier: str,
    m: int,
    n: int,
    *,
    kind: str = "rademacher",
    scale: str = "jl",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    version: int = DEFAULT_PROJECTION_VERSION,
) -> torch.Tensor:
    """The ``[m, n]`` right projection of a flattened module gradient (global target).

    Version 1 is the plain matrix of ``identifier``; version 2 concatenates column
    blocks named ``"<identifier>/<start>"`` (bergson's layout). ``row_norm`` divides by
    the norm of each whole row, across blocks.
    """
    if check_version(version) == 1:
        return projection_matrix(
            identifier, m, n, kind=kind, scale=scale, dtype=dtype, device=device, version=1
        )
    step = max(1, GLOBAL_BLOCK_NUMEL // m)
    parts = [
        philox_matrix(f"{identifier}/{start}", m, min(n, start + step) - start, kind)
        for start in range(0, n, step)
    ]
    full = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    mat = torch.from_numpy(full).to(device=device, dtype=dtype)
    return _scaled(mat, m, scale)


class ProjectionCache:
    """Per-engine cache so each matrix is generated once per (identifier, shape, device, dtype).

    Holds the run's projection settings: type, scale, version and optional seed (which
    becomes part of every identifier).
    """

    def __init__(
        self,
        kind: str,
        scale: str,
        version: int = DEFAULT_PROJECTION_VERSION,
        seed: int | None = None,
    ):
        self.kind, self.scale = kind, scale
        self.version = check_version(version)
        self.seed = seed
        self._cache: dict[tuple, torch.Tensor] = {}

    def identifier(self, name: str, role: str) -> str:
        return projection_identifier(name, role, self.seed)

    def get(self, name: str, role: str, m: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The ``role`` (``left``/``right``/``single``) ``[m, n]`` matrix of block ``name``."""
        ident = self.identifier(name, role)
        key = (ident, m, n, dtype, str(device))
        mat = self._cache.get(key)
        if mat is None:
            make = global_projection_matrix if role == "single" else projection_matrix
            mat = make(
                ident, m, n, kind=self.kind, scale=self.scale, dtype=dtype, device=device,
                version=self.version,
            )  # fmt: skip
            self._cache[key] = mat
        return mat
