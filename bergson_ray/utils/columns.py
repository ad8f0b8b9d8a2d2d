"""Where each module's block sits in a flat gradient row."""

from __future__ import annotations

from collections.abc import Mapping


def column_offsets(grad_sizes: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """Module -> ``(start, end)`` column range in a flat row (cumulative ``grad_sizes``)."""
    out, start = {}, 0
    for name, size in grad_sizes.items():
        out[name] = (start, start + size)
        start += size
    return out
