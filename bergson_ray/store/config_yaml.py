"""Read back the ``config.yaml`` a run wrote, so a store's settings can be replayed.

The query side uses this to rebuild the exact engine (model, projection, loss,
normalizers) that produced a store's rows.

A build step's body holds our own config (``dataclasses.asdict(BuildConfig)``) and,
beside it, bergson-shaped ``index_cfg`` and ``preprocess_cfg`` sections
(:func:`build_step_body`): bergson's ``score`` reads the query store's
``preprocess_cfg`` and its ``query`` reads ``index_cfg``. Our reader ignores them in our
files, and rebuilds a ``BuildConfig`` from them in bergson's (which hold nothing else).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..config.coerce import from_dict
from ..errors import StoreError

T = TypeVar("T")


def load_step_config(run_path: str | Path, cls: type[T], command: str | None = None) -> T:
    """The config dataclass of the (first matching) step in ``<run_path>/config.yaml``."""
    path = Path(run_path) / "config.yaml"
    if not path.is_file():
        raise StoreError(f"{path} is missing: cannot tell how {run_path} was built")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise StoreError(f"{path} is not valid YAML: {err}") from err
    steps = doc.get("steps") or []
    for step in steps:
        for name, body in step.items():
            if command is None or name == command:
                fields = getattr(cls, "__dataclass_fields__", {})
                body = body or {}
                if not set(body) & set(fields) and _BUILD_SECTIONS <= set(fields):
                    translated = _from_bergson_step(body, Path(run_path))
                    if translated is not None:  # a step bergson wrote
                        return from_dict(cls, translated)
                body = {k: v for k, v in body.items() if k in fields}
                grad = body.get("grad")
                if isinstance(grad, dict) and "projection_version" not in grad:
                    # written before we recorded it: every such store has version-1 matrices
                    body["grad"] = {**grad, "projection_version": 1}
                return from_dict(cls, body)
    raise StoreError(f"{path} holds no {command or 'step'} configuration")


# ------------------------------------------------------------------------ bergson sections


def _resolved(name: str, resolve) -> str:
    """``tiny`` -> its local directory (bergson cannot resolve our embedded default)."""
    from ..config.sections import TINY

    return resolve(name) if name == TINY else name


def bergson_index_cfg(cfg: Any) -> dict[str, Any]:
    """bergson's ``IndexConfig`` (as ``config.yaml`` holds it) for a :class:`BuildConfig`.

    Only keys bergson's ``IndexConfig`` knows; ``tiny`` is resolved to local paths so
    bergson can load the same model and data.
    """
    from ..defaults.tiny import resolve_dataset, resolve_model_path

    g, d, m = cfg.grad, cfg.data, cfg.model
    return {
        "run_path": str(cfg.run.run_path),
        "overwrite": bool(cfg.run.overwrite),
        "model": _resolved(m.model, resolve_model_path),
        "precision": m.precision,
        "revision": m.revision,
        "fsdp": bool(cfg.ray.fsdp),
        "model_kwargs": m.model_kwargs,
        "peft_init_kwargs": getattr(m, "peft_init_kwargs", ""),
        "data": {
            "dataset": _resolved(d.dataset, resolve_dataset),
            "split": d.split,
            "subset": d.subset,
            "prompt_column": d.prompt_column,
            "completion_column": d.completion_column,
            "conversation_column": d.conversation_column,
            "reward_column": d.reward_column,
            "skip_nan_rewards": d.skip_nan_rewards,
            "truncation": d.truncation,
            "data_kwargs": d.data_kwargs,
            "advantage_column": d.advantage_column,
            "format_template": d.format_template,
            "chunk_length": d.chunk_length,
        },
        "max_tokens": d.max_tokens,
        "logit_scale": g.logit_scale,
        "tokenizer": _resolved(m.tokenizer, resolve_model_path),
        "drop_columns": bool(cfg.drop_columns),
        "projection_dim": g.projection_dim,
        "include_bias": g.include_bias,
        "reshape_to_square": bool(getattr(g, "reshape_to_square", False)),
        "projection_type": g.projection_type,
        "projection_scale": g.projection_scale,
        "projection_target": g.projection_target,
        "projection_seed": g.projection_seed,
        "token_batch_size": cfg.batch.token_batch_size,
        "max_batch_size": cfg.batch.max_batch_size,
        "auto_batch_size": bool(getattr(cfg.batch, "auto_batch_size", False)),
        "optimizer_state": g.optimizer_state,
        "loss_fn": g.loss_fn,
        "loss_reduction": g.loss_reduction,
        "label_smoothing": g.label_smoothing,
        "split_attention_modules": list(g.split_attention_modules),
        "attention": dataclasses.asdict(g.attention),
        "filter_modules": g.filter_modules,
        "attribute_tokens": g.attribute_tokens,
        "modules": list(g.modules),
    }


def bergson_preprocess_cfg(pre: Any) -> dict[str, Any]:
    """bergson's ``PreprocessConfig`` for our :class:`PreprocessConfig` (nested inversion)."""
    return {
        "unit_normalize": pre.unit_normalize,
        "hessian_path": pre.hessian_path,
        "ev_correction": pre.ev_correction,
        "inversion_cfg": {
            "inversion": pre.inversion,
            "damping_factor": pre.damping_factor,
            "apply_batch_size": getattr(pre, "apply_batch_size", 2),
        },
        "aggregation": pre.aggregation,
        "normalize_aggregated_grad": pre.normalize_aggregated_grad,
    }


_BUILD_SECTIONS = {"run", "model", "data", "grad", "batch", "preprocess"}
_PREPROCESS_KEYS = (
    "unit_normalize",
    "hessian_path",
    "ev_correction",
    "aggregation",
    "normalize_aggregated_grad",
)


def _known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def _from_bergson_step(body: dict[str, Any], run_path: Path) -> dict[str, Any] | None:
    """Our ``BuildConfig`` sections from a step bergson wrote (``index_cfg`` and
    ``preprocess_cfg``), the inverse of :func:`build_step_body`; None if it is not one.

    bergson's ``config.yaml`` does not say which projection generator made the rows;
    its ``processor_config.yaml`` does (no key = version 1).
    """
    from ..config.sections import AttentionConfig, DataConfig, GradientConfig, IndexModelConfig
    from ..store.processor import ProcessorConfig

    idx = body.get("index_cfg")
    if not isinstance(idx, dict):
        return None
    pre = body.get("preprocess_cfg") or {}
    inv = pre.get("inversion_cfg") or {}
    grad = _known(GradientConfig, {k: v for k, v in idx.items() if k != "attention"})
    if isinstance(idx.get("attention"), dict):
        grad["attention"] = _known(AttentionConfig, idx["attention"])
    proc = ProcessorConfig.load(run_path)
    if proc is not None:
        grad["projection_version"] = proc.projection_version
    out: dict[str, Any] = {
        "run": {"run_path": str(idx.get("run_path", run_path))},
        "model": _known(IndexModelConfig, idx),
        "data": {
            **_known(DataConfig, idx.get("data") or {}),
            **({"max_tokens": idx["max_tokens"]} if idx.get("max_tokens") is not None else {}),
        },
        "grad": grad,
        "batch": {
            k: idx[k] for k in ("token_batch_size", "max_batch_size", "auto_batch_size") if k in idx
        },
        "preprocess": {
            **{k: pre[k] for k in _PREPROCESS_KEYS if k in pre},
            **{k: inv[k] for k in ("inversion", "damping_factor", "apply_batch_size") if k in inv},
        },
    }
    if "drop_columns" in idx:
        out["drop_columns"] = bool(idx["drop_columns"])
    return out


def build_step_body(cfg: Any) -> dict[str, Any]:
    """The ``build:`` step body of ``config.yaml``: our :class:`BuildConfig` fields plus
    bergson's ``index_cfg`` and ``preprocess_cfg`` (see the module docstring)."""
    body = dataclasses.asdict(cfg)
    body["index_cfg"] = bergson_index_cfg(cfg)
    body["preprocess_cfg"] = bergson_preprocess_cfg(cfg.preprocess)
    return body


RESUME_FREE_SECTIONS = ("run", "ray")
"""Config sections that never shape a stored row: where and how wide the run goes."""


def check_resume_settings(part: str | Path, command: str, cfg: Any) -> None:
    """Refuse to ``--resume`` ``part`` with settings other than those it was started with.

    Every field outside :data:`RESUME_FREE_SECTIONS` shapes a row (model, data, columns,
    projection, normalizers, precision, token budget, preprocessing, scoring), so a
    difference would silently mix two runs in one store. The message names the first few
    differences as ``--flag: started with X, now Y``.
    """
    from ..errors import BadInputError

    if not (Path(part) / "config.yaml").is_file():
        return  # nothing recorded yet: the interrupted run died before writing its config
    started = load_step_config(part, type(cfg), command)
    before = dotted_leaves(dataclasses.asdict(started))
    now = dotted_leaves(dataclasses.asdict(cfg))
    diffs = [
        f"--{key.rsplit('.', 1)[-1]}: started with {before.get(key)!r}, now {now.get(key)!r}"
        for key in sorted(set(before) | set(now))
        if key.split(".", 1)[0] not in RESUME_FREE_SECTIONS and before.get(key) != now.get(key)
    ]
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise BadInputError(
            f"--resume: {part} was started with other settings ({shown}); rerun with the "
            "same settings, or use --overwrite to start again"
        )


def dotted_leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings dict flattened to ``{"section.key": value}`` (for naming what
    differs between two runs' settings)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(dotted_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
