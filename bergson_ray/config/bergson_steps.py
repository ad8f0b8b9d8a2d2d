"""Pipeline documents (``steps:`` YAML) of bergson and of ours, as our configs.

bergson nests a step's options in sections (``index_cfg``, ``preprocess_cfg``,
``hessian_cfg``, ``score_cfg``, ``hessian_pipeline_cfg.query``, ...), while our configs
are made from flat flag names that *are* bergson's option names. So a bergson step is
translated by flattening its sections into flag names (``data`` and ``query`` keep a
prefix, as on our command line) and coercing those like CLI flags; options that only
steer bergson's own process launcher are dropped, anything else unknown is an error
naming the step and the key. A step we wrote ourselves (``config.yaml`` of our runs)
holds our sections directly and is read as is.

This module is pure: no I/O beyond what it is given, no Ray.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any

from ..errors import BadInputError
from .coerce import as_config, field_types, from_dict, section_of, unwrap_optional

log = logging.getLogger(__name__)

BERGSON_COMMANDS: tuple[str, ...] = (
    "approxunrolling",
    "build",
    "ekfac",
    "hessian",
    "lissa",
    "magic",
    "metasmoothness",
    "mix",
    "query",
    "recall",
    "reduce",
    "score",
    "test_model_configuration",
    "trackstar",
    "train",
    "trak",
    "validate",
)
"""bergson 2.5.1's commands; a step may name any of them (those we lack fail clearly)."""

LAUNCHER_KEYS = frozenset(
    {"distributed", "nproc_per_node", "nnode", "node_rank", "wandb_project", "debug"}
)
"""bergson options for its own process launcher and logging; Ray replaces them."""

_RENAMES: dict[tuple[str, str], tuple[str, ...]] = {
    ("score_cfg", "precision"): ("score_precision",),
    ("query", "aggregation"): ("query_aggregation", "aggregation"),
    ("query", "path"): ("query_path",),
    ("approx_unrolling_cfg", "query_aggregation"): ("aggregation",),
    ("score_cfg", "batch_size"): (),
}
"""(bergson section, key) -> our flag names where the two differ, the first the command
has wins: the query set's aggregation is ``query_aggregation`` in ``ekfac``/``lissa`` and
``aggregation`` in ``trackstar``/``trak``/``approxunrolling``; bergson's ``query.path``
(an existing query index) is our ``query_path``; ``approx_unrolling_cfg.query_aggregation``
is bergson's older spelling of its ``query.aggregation``. An empty tuple: no flag of ours
(``score_cfg.batch_size``, scoring's rows per product, must not become ``lissa``'s
``batch_size``); such a key is judged by ``BERGSON_DEFAULTS`` alone."""

_QUERY_LEVEL = frozenset({"query_aggregation", "aggregation", "query_path"})
"""Renamed query keys that are flags of the command, not of its ``query.`` dataset."""

_SECTION_FLAGS: dict[str, str] = {"lissa_cfg": "lissa"}
"""bergson sections whose keys are the fields of one section of ours. Their keys are put
there by name, not looked up flat: ``lissa_cfg.batch_size`` (documents per
Hessian-vector product) is our ``lissa.batch_size``, while ``score_cfg.batch_size`` of
the same step is another option (see ``BERGSON_DEFAULTS``)."""

_BERGSON_ONLY_SECTIONS = frozenset({"candidates"})
"""bergson sub-sections whose keys are never flags of a command that lacks our section of
that name (``score_cfg.candidates.top_k`` is not ``trak``'s ``top_k``): each key is
judged by ``BERGSON_DEFAULTS`` alone."""

_SET_BY_QUERY_STEP = frozenset({("score_cfg", "query_path")})
"""(section, key) that bergson's pipelines with a query set (``lissa``, ``trak``,
``trackstar``, ``ekfac``) overwrite with their own query step's output before use, so a
value in the step changes nothing; an existing query index is their ``query.path``."""

IGNORED = object()

BERGSON_DEFAULTS: dict[str, Any] = {
    "chunk_length": 0,
    "format_template": "",
    "advantage_column": "",
    "max_tokens": None,
    "logit_scale": 1.0,
    "peft_init_kwargs": "",
    "use_tf32_matmuls": False,
    "force_math_sdp": False,
    "reshape_to_square": IGNORED,
    "auto_batch_size": False,
    "unit_normalize": False,
    "aggregation": "none",
    "normalize_aggregated_grad": False,
    "contrast": None,
    "path": "",
    "astra": IGNORED,
    "batch_size@score_cfg": IGNORED,
    "grad_checkpointing": False,
    "drop_columns": IGNORED,
    "profile": IGNORED,
    "ev_correction": False,
    "hessian_path": "",
    "apply_batch_size@inversion_cfg": IGNORED,
    "damping_factor@inversion_cfg": IGNORED,
    "inversion@inversion_cfg": IGNORED,
    "scores@candidates": "",
    "top_k@candidates": 0,
    "fraction@candidates": 0.0,
    "direction@candidates": "proponents",
    "higher_is_better@candidates": None,
    "token_influence": "gradient",
}
"""bergson options a command of ours lacks: accepted at bergson's default (``IGNORED``:
any value, it does not change results here), an error naming them otherwise.

A command that has the option takes it as its own flag (:func:`flatten_bergson` looks
there first): ``build`` / ``score`` / ``hessian`` map ``peft_init_kwargs``,
``auto_batch_size``, ``reshape_to_square``, ``force_math_sdp``, ``use_tf32_matmuls`` and
the data options onto their real flags. The entries stay for the commands that lack them
(``train``, ``magic``, ``validate``, ``ekfac``'s model section, ...): bergson writes every
field of its configs, so its YAML for those commands carries them at their defaults.
``reshape_to_square`` changes nothing in bergson 2.5.1 (its collector never reshapes), so
any value is accepted where we lack it. ``drop_columns`` only decides whether the
``data.hf`` written beside a store keeps the dataset's own columns; ``build`` and ``score``
take it as their flag, the commands that lack it (``lissa``, ``approxunrolling``,
``trak``, ``trackstar``, ``ekfac``) always keep those columns beside the length and loss
ones bergson writes, so any value gives the same scores and a superset of bergson's
``data.hf``. ``profile`` only turns on bergson's torch profiler. ``preprocess_cfg``'s
``inversion_cfg`` inverts its ``hessian_path`` and nothing else, so where a command has
neither (``lissa``) it is inert once ``hessian_path`` is unset. ``score_cfg.candidates``
(rescore an earlier run's best rows) exists in ``score`` only; elsewhere it must stay off.
A ``key@section`` entry applies to that bergson section only, where the command lacks a
flag of that name."""

_OWN_SECTIONS = frozenset({"run", "grad", "batch", "ray"})


@dataclasses.dataclass
class Step:
    """One step of a pipeline document, translated: its command and config."""

    index: int
    command: str
    config: Any
    resume: bool

    @property
    def label(self) -> str:
        return f"step {self.index} ({self.command})"


def expand_matrix(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A step's ``matrix: {key: [values]}`` as one body per grid cell.

    ``{key}`` inside a string is replaced by the cell's value; a string that is exactly
    ``{key}`` becomes the value itself (keeping its type). Two cells writing the same
    ``run_path`` are an error (vary it with a ``{key}``).
    """
    body = dict(body)
    matrix = body.pop("matrix", None)
    if matrix is None:
        return [body]
    if not isinstance(matrix, dict) or not all(isinstance(v, list) and v for v in matrix.values()):
        raise BadInputError(f"matrix must map each key to a non-empty list, got {matrix!r}")
    cells = [dict(zip(matrix, values)) for values in itertools.product(*matrix.values())]
    out = [_substitute(body, cell) for cell in cells]
    seen: dict[str, dict] = {}
    for cfg, cell in zip(out, cells):
        for path in _run_paths(cfg):
            if path in seen:
                raise BadInputError(
                    f"matrix cells {seen[path]} and {cell} both write {path}; "
                    "put a {key} substitution in run_path"
                )
            seen[path] = cell
    if len(cells) > 1 and not seen:
        raise BadInputError("a matrix step needs a run_path with a {key} substitution")
    return out


def _substitute(value: Any, cell: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, cell) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, cell) for v in value]
    if isinstance(value, str):
        for key, cell_value in cell.items():
            if value == "{" + key + "}":
                return cell_value
            value = value.replace("{" + key + "}", str(cell_value))
    return value


def _run_paths(value: Any):
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "run_path" and isinstance(v, str):
                yield v
            else:
                yield from _run_paths(v)


def flatten_bergson(body: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    """Flag-named options (``"projection_dim"``, ``"query.split"``) from a bergson step.

    ``where`` names the step in error messages.
    """
    has_query = _is_section(cls, "query")
    flat: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if key in flat and flat[key] != value:
            raise BadInputError(f"{where}: {key!r} is given twice with different values")
        flat[key] = value

    def walk(obj: dict[str, Any], section: str, prefix: str, flags: bool = True) -> None:
        for key, value in obj.items():
            if key in LAUNCHER_KEYS:
                log.debug("%s: ignoring bergson launcher option %r", where, key)
                continue
            if key == "matrix":
                raise BadInputError(f"{where}: matrix must sit directly under the command")
            if key == "query" and isinstance(value, dict):
                if not has_query:
                    raise BadInputError(f"{where}: this command takes no query dataset")
                nested = value.get("data") or {}
                value = {**nested, **{k: v for k, v in value.items() if k != "data"}}
            if isinstance(value, dict) and _is_section(cls, f"{prefix}{key}"):
                walk(value, key, f"{prefix}{key}.")  # one of our sections: keep its prefix
            elif isinstance(value, dict):
                # a bergson sub-section: its keys are our flags, unless it is one we lack
                walk(value, key, prefix, flags and key not in _BERGSON_ONLY_SECTIONS)
            else:
                leaf(section, prefix, key, value, flags)

    def leaf(section: str, prefix: str, key: str, value: Any, flags: bool) -> None:
        if has_query and (section, key) in _SET_BY_QUERY_STEP:
            log.debug("%s: ignoring %s.%s (set by the query step)", where, section, key)
            return
        own = _SECTION_FLAGS.get(section)
        if flags and own and _known(cls, f"{own}.", key):
            put(f"{own}.{key}", value)
            return
        for name in _RENAMES.get((section, key), (key,)) if flags else ():
            at = "" if name in _QUERY_LEVEL and section == "query" else prefix
            if _known(cls, at, name):
                put(f"{at}{name}", value)
                return
        special = f"{key}@{section}"
        default_key = special if special in BERGSON_DEFAULTS else key
        if default_key not in BERGSON_DEFAULTS:
            raise BadInputError(f"{where}: unknown option {key!r}")
        allowed = BERGSON_DEFAULTS[default_key]
        if allowed is IGNORED or value == allowed or value is None:
            log.debug("%s: ignoring %s=%r (bergson's default)", where, key, value)
            return
        raise BadInputError(
            f"{where}: {key}={value!r} is not supported by bergson-ray yet "
            f"(only bergson's default, {allowed!r})"
        )

    walk(body, "", "")
    return flat


def _section_type(cls: type, dotted: str) -> type | None:
    """The dataclass at ``dotted`` (``"filter.controls"``) inside ``cls``, or None."""
    tp: Any = cls
    for part in dotted.split("."):
        hints = field_types(tp)
        if part not in hints:
            return None
        tp, _ = unwrap_optional(hints[part])
        if not dataclasses.is_dataclass(tp):
            return None
    return tp


def _is_section(cls: type, dotted: str) -> bool:
    return _section_type(cls, dotted) is not None


def _known(cls: type, prefix: str, name: str) -> bool:
    """Whether our config ``cls`` has the flag ``prefix + name``."""
    if not prefix:
        return section_of(cls, name) is not None
    tp = _section_type(cls, prefix.rstrip("."))
    return tp is not None and name in _fields(tp)


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def is_own_layout(body: dict[str, Any], cls: type) -> bool:
    """True for a step body in our own layout (``run:``, ``grad:`` ... sections)."""
    return bool(set(body) & _OWN_SECTIONS & _fields(cls))


def step_config(command: str, body: dict[str, Any] | None, cls: type, where: str) -> Any:
    """Our config of ``cls`` for one step body (bergson's layout or ours)."""
    body = dict(body or {})
    if is_own_layout(body, cls):
        ours = {k: v for k, v in body.items() if k in _fields(cls)}
        return from_dict(cls, ours)
    flat = flatten_bergson(body, cls, where)
    try:
        return as_config(cls, None, **flat)
    except BadInputError as err:
        raise BadInputError(f"{where}: {err}") from None


def step_resume(body: dict[str, Any] | None) -> bool:
    """Whether a step asks to resume (``resume: true`` anywhere bergson allows it)."""
    body = body or {}
    found = bool(body.get("resume"))
    for key, value in body.items():
        if key.endswith("_cfg") and isinstance(value, dict):
            found = found or bool(value.get("resume"))
    return found
