"""The one parser of ``key=value,key2=value2`` option strings (``--data_kwargs``,
``--model_kwargs``, ``--worker_resources``, ``--worker_labels``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import BadInputError


def parse_scalar(value: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, ``"none"`` -> None, ``"a|b"`` ->
    ``["a", "b"]`` (each part parsed the same way), anything else stays a string."""
    v = value.strip()
    if "|" in v:
        return [parse_scalar(part) for part in v.split("|")]
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_kv(
    text: str | None, what: str, cast: Callable[[str], Any] = parse_scalar
) -> dict[str, Any]:
    """``"a=1,b=x"`` -> ``{"a": cast("1"), "b": cast("x")}``; empty text -> ``{}``.

    ``what`` names the option (``--worker_resources``) in the error message.
    """
    out: dict[str, Any] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise BadInputError(
                f"{what}: expected key=value pairs separated by commas, got {part!r}"
            )
        try:
            out[key.strip()] = cast(val.strip())
        except ValueError:
            raise BadInputError(
                f"{what}: bad value for {key.strip()!r}: {val.strip()!r}"
            ) from None
    return out
