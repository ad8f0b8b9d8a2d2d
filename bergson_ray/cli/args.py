"""Turn config dataclasses into argparse flags and back.

Flags carry bergson's names (``--projection_dim``, ``--token_batch_size`` ...): nested
dataclasses are flattened, so ``BuildConfig.grad.projection_dim`` is ``--projection_dim``.
Where two nested configs share a field name, the second gets a dotted prefix
(``--query.dataset``). Booleans accept ``--flag``, ``--flag true`` and ``--flag false``
so bergson command lines (``--overwrite true``) work unchanged.

Each flag's help is the field's docstring (``config/docs.py``) and the default shown is
the *command's* default (``ekfac`` shows ``--ev_correction`` as true), because the
values come from the command config's default instance, the same instance that
:func:`bergson_ray.config.from_dict` merges the given flags into.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal, TypeVar, get_args, get_origin

from ..config.coerce import default_instance, field_types, from_dict, unwrap_optional
from ..config.commands import SECTION_HELP
from ..config.docs import field_docs

T = TypeVar("T")


def str2bool(value: str) -> bool:
    """``true/false/yes/no/1/0/on/off`` -> bool (argparse type of every boolean flag)."""
    low = value.lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def split_list(value: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` (argparse type of list flags)."""
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclasses.dataclass
class Flag:
    """One command-line flag for one leaf field of a (nested) config."""

    flag: str
    path: str
    type: Any
    default: Any
    help: str
    section: str


_PATH_NAMES = ("model", "tokenizer", "dataset", "store", "optimizer_state", "manifest", "scores")


def _metavar(name: str, tp: Any) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if tp is int:
        return "N"
    if tp is float:
        return "FLOAT"
    if leaf.endswith(("kwargs", "_resources", "_labels")):
        return "K=V,..."
    if leaf.endswith(("_path", "_dir", "paths")) or leaf in _PATH_NAMES:
        return "PATH"
    return "TEXT"


def flags_for(cls: type, *, skip: tuple[str, ...] = ()) -> list[Flag]:
    """Every leaf field of ``cls`` as a :class:`Flag`, with the command's defaults."""
    out: list[Flag] = []
    taken: set[str] = set()

    def walk(klass: type, obj: Any, prefix: str, section: str) -> None:
        hints = field_types(klass)
        docs = field_docs(klass)
        for f in dataclasses.fields(klass):
            tp, _ = unwrap_optional(hints[f.name])
            path = f"{prefix}{f.name}"
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(tp):
                walk(tp, value, f"{path}.", section or f.name)
                continue
            flag = f.name if f.name not in taken else path
            taken.add(flag)
            if flag in skip or path in skip or f.name in skip:
                continue
            out.append(Flag(flag, path, hints[f.name], value, docs.get(f.name, ""), section))

    walk(cls, default_instance(cls), "", "")
    return out


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "''"
    if isinstance(value, str):
        return value or "''"
    return str(value)


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()
) -> None:
    """Add one ``--flag`` per leaf field of ``cls`` (nested sections as argument groups)."""
    groups: dict[str, Any] = {}
    for fl in flags_for(cls, skip=skip):
        base, _optional = unwrap_optional(fl.type)
        dest = "cfg__" + fl.path.replace(".", "__")
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
        if base is bool:
            kwargs.update(nargs="?", const=True, type=str2bool, metavar="BOOL")
        elif get_origin(base) is Literal:
            choices = list(get_args(base))
            kwargs.update(choices=choices, type=type(choices[0]))
        elif get_origin(base) is list:
            kwargs.update(type=split_list, metavar="A,B,...")
        elif base in (int, float):
            kwargs.update(type=base, metavar=_metavar(fl.flag, base))
        else:
            kwargs.update(type=str, metavar=_metavar(fl.flag, base))
        text = f"{fl.help} " if fl.help else ""
        kwargs["help"] = f"{text}(default: {_show(fl.default)})".replace("%", "%%")
        target = parser
        if fl.section:
            if fl.section not in groups:
                title = SECTION_HELP.get(fl.section, fl.section)
                groups[fl.section] = parser.add_argument_group(f"{fl.section}: {title}")
            target = groups[fl.section]
        target.add_argument(f"--{fl.flag}", **kwargs)


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
    return from_dict(cls, nest(values))


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    nested: dict[str, Any] = {}
    for path, val in flat.items():
        cur = nested
        parts = path.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = val
    return nested
