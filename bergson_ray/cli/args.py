"""Turn config dataclasses into argparse flags and back.

Flags carry bergson's names (``--projection_dim``, ``--token_batch_size`` ...): nested
dataclasses are flattened, so ``BuildConfig.grad.projection_dim`` is ``--projection_dim``.
Where two nested configs share a field name, the second gets a dotted prefix
(``--attention.num_heads``). Booleans accept ``--flag``, ``--flag true`` and
``--flag false`` so bergson command lines (``--overwrite true``) work unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


def _str2bool(value: str) -> bool:
    low = value.lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _flags_for(cls: type, prefix: str, taken: set[str]) -> list[tuple[str, str, Any, Any]]:
    """Return (flag, dest_path, type, default) for every leaf field of ``cls``."""
    out: list[tuple[str, str, Any, Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.extend(_flags_for(tp, f"{path}.", taken))
            continue
        flag = f.name if f.name not in taken else path
        taken.add(flag)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        out.append((flag, path, tp, default))
    return out


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()
) -> None:
    """Add one ``--flag`` per leaf field of ``cls`` (recursing into nested dataclasses)."""
    taken: set[str] = set()
    for flag, path, tp, default in _flags_for(cls, "", taken):
        # a skipped field (e.g. the positional run_path) gets no flag under any spelling
        if flag in skip or path in skip or path.rsplit(".", 1)[-1] in skip:
            continue
        base, _optional = _unwrap_optional(tp)
        dest = "cfg__" + path.replace(".", "__")
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
        help_default = f"(default: {default!r})"
        if base is bool:
            kwargs.update(nargs="?", const=True, type=_str2bool, metavar="BOOL")
        elif get_origin(base) is Literal:
            choices = list(get_args(base))
            kwargs.update(choices=choices, type=type(choices[0]))
        elif get_origin(base) is list:
            kwargs.update(type=_split_list, metavar="A,B,...")
        elif base in (int, float, str):
            kwargs.update(type=base)
        else:
            kwargs.update(type=str)
        parser.add_argument(f"--{flag}", help=help_default, **kwargs)


def build_dataclass(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """Instantiate ``cls`` from the flags parsed by :func:`add_dataclass_args`.

    ``overrides`` are dotted paths (``run.run_path="x"``) applied after the flags.
    """
    values: dict[str, Any] = {}
    for key, val in vars(ns).items():
        if key.startswith("cfg__"):
            values[key[5:].replace("__", ".")] = val
    for key, val in overrides.items():
        values[key.replace("__", ".")] = val
    return from_dict(cls, _nest(values))


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for path, val in flat.items():
        cur = nested
        parts = path.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = val
    return nested


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Recursively build dataclass ``cls`` from a (possibly partial) nested dict."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown option(s) for {cls.__name__}: {sorted(unknown)}")
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        val = data[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(val, dict):
            val = from_dict(tp, val)
        kwargs[f.name] = val
    return cls(**kwargs)  # type: ignore[call-arg]
