"""The one way a config is made: from CLI flags, a YAML step, a dict or keyword arguments.

Every front end ends in :func:`from_dict` (nested dict -> dataclass) or :func:`as_config`
(config / dict / flat keyword overrides -> dataclass). Both start from the *command's*
default instance, so setting one field of a nested section keeps the command's defaults
for the others (``ekfac --seed 3`` still fits EK-FAC, not KFAC). Validation runs in each
dataclass's ``__post_init__``, so it happens exactly once for every config that is made,
whatever made it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union, get_args, get_origin

from ..errors import BadInputError

T = TypeVar("T")


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass (string annotations evaluated)."""
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], base: T | None = None) -> T:
    """Build dataclass ``cls`` from a (possibly partial) nested dict.

    Fields absent from ``data`` keep their value in ``base`` (default: ``cls()``), and a
    nested section given as a dict is merged into ``base``'s section, never rebuilt from the
    section class's own defaults. Unknown keys are an error naming them.
    """
    if not isinstance(data, dict):
        raise BadInputError(f"{cls.__name__}: expected a mapping of options, got {data!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise BadInputError(
            f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}"
        )
    hints = field_types(cls)
    start = base if base is not None else default_instance(cls)
    kwargs: dict[str, Any] = {}
    for name in names:
        f = next(x for x in dataclasses.fields(cls) if x.name == name)
        if not f.init:
            continue
        current = getattr(start, name)
        if name not in data:
            kwargs[name] = current
            continue
        tp, _ = unwrap_optional(hints[name])
        val = data[name]
        if dataclasses.is_dataclass(tp) and isinstance(val, dict):
            val = from_dict(tp, val, base=current if dataclasses.is_dataclass(current) else None)
        else:
            val = coerce_value(name, tp, val)
        kwargs[name] = val
    return cls(**kwargs)  # type: ignore[call-arg]


_TRUE, _FALSE = ("1", "true", "yes", "y", "on"), ("0", "false", "no", "n", "off")


def coerce_value(name: str, tp: Any, val: Any) -> Any:
    """A YAML or keyword value as the field's type: YAML reads ``1e-6`` as a string and
    bergson's documents write lists as ``"a,b"``, so text is converted where the field
    wants a number, a bool or a list; anything else passes through unchanged."""
    if not isinstance(val, str):
        if tp is float and isinstance(val, int) and not isinstance(val, bool):
            return float(val)
        return val
    try:
        if tp is bool:
            low = val.strip().lower()
            if low in _TRUE or low in _FALSE:
                return low in _TRUE
            raise ValueError(val)
        if tp is int:
            return int(val)
        if tp is float:
            return float(val)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}[tp]
        raise BadInputError(f"--{name} expects {kind}, got {val!r}") from None
    if get_origin(tp) is list:
        return [v.strip() for v in val.split(",") if v.strip()]
    return val


def default_instance(cls: type[T]) -> T:
    """``cls()``; for a config whose defaults alone do not validate, the same values
    without running its checks (used to read defaults, never to run)."""
    try:
        return cls()
    except BadInputError:
        # a config whose defaults alone do not validate (e.g. a required path): build it
        # without running __post_init__, only to read its default values
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                object.__setattr__(obj, f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                object.__setattr__(obj, f.name, f.default_factory())  # type: ignore[misc]
        return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` (the form ``config.yaml`` records)."""
    return dataclasses.asdict(cfg)


def section_of(cls: type, key: str) -> list[str] | None:
    """Dotted path to the first field named ``key`` in ``cls`` (depth first: top-level
    fields win, then sections in declaration order), or None."""
    names = {f.name for f in dataclasses.fields(cls)}
    hints = field_types(cls)
    if key in names and not dataclasses.is_dataclass(unwrap_optional(hints[key])[0]):
        return [key]
    for f in dataclasses.fields(cls):
        tp, _ = unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            sub = section_of(tp, key)
            if sub is not None:
                return [f.name, *sub]
    return None


def as_config(cls: type[T], cfg: T | dict | None = None, **overrides: Any) -> T:
    """A config of ``cls`` from a config, a nested dict, or flat keyword overrides.

    Flat keys take the CLI flag names (``build(run_path=..., dataset="tiny",
    projection_dim=16)``); a dotted key (``query.dataset``) names a nested field, as the
    CLI's dotted flags do. The result is validated once (by ``__post_init__``).
    """
    if cfg is None:
        data: dict[str, Any] = {}
        base = None
    elif isinstance(cfg, dict):
        data, base = cfg, None
    elif isinstance(cfg, cls):
        data, base = {}, cfg
    else:
        raise BadInputError(f"expected a {cls.__name__} or a dict, got {type(cfg).__name__}")
    nested = _nest_overrides(cls, overrides)
    merged = _merge(data, nested)
    return from_dict(cls, merged, base=base)


def _nest_overrides(cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in overrides.items():
        path = key.split(".") if "." in key else section_of(cls, key)
        if path is None:
            # a section given whole (``grad=GradientConfig(...)`` or ``grad={...}``)
            if key in {f.name for f in dataclasses.fields(cls)}:
                path = [key]
            else:
                raise BadInputError(f"unknown option {key!r} for {cls.__name__}")
        if path[-1] == "run_path":
            val = str(val)
        cur = out
        for part in path[:-1]:
            cur = cur.setdefault(part, {})
        if dataclasses.is_dataclass(val) and not isinstance(val, type):
            val = {f.name: getattr(val, f.name) for f in dataclasses.fields(val)}
        cur[path[-1]] = val
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, val in b.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], val)
        else:
            out[key] = val
    return out
