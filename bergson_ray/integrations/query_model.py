"""Which model a callback store's ``config.yaml`` names, for the query side to load.

``serve`` (text queries) and ``score --query_path`` rebuild the engine that made a
store's rows from its ``config.yaml``; a store written while training has no ``build``
command line, so the callback records the model itself:

* ``model_name_or_path`` when the user gives one (e.g. the final checkpoint's directory);
* else where the trainer's model was loaded from (``model.name_or_path``: a Hub id, or a
  local directory, made absolute so the store can be served from anywhere);
* else (a model built in code) the trainer's ``output_dir``, where
  ``trainer.save_model()`` writes it.

The tokenizer is the trainer's ``processing_class`` when it came from somewhere else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..config.sections import IndexModelConfig

log = logging.getLogger(__name__)

_PRECISION = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
}


def _located(name: str) -> str:
    """``name`` made absolute when it is a local path (a Hub id stays as it is)."""
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def _name_of(obj: Any) -> str:
    name = getattr(obj, "name_or_path", "") or getattr(
        getattr(obj, "config", None), "_name_or_path", ""
    )
    return str(name) if name else ""


def _precision(model: Any) -> str:
    """The weights' dtype as ``--precision`` names it (``auto`` when unknown)."""
    try:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    except (StopIteration, AttributeError, TypeError):
        return "auto"
    return _PRECISION.get(dtype, "auto")


def query_model_config(
    model: Any, processing_class: Any, output_dir: str | None, override: str | None = None
) -> IndexModelConfig:
    """The :class:`IndexModelConfig` a callback store records (see the module docstring)."""
    name = _name_of(model)
    if override:
        ref = _located(override)
    elif name:
        ref = _located(name)
    else:
        ref = str(Path(output_dir or ".").expanduser().resolve())
        log.info(
            "the trained model was not loaded from a path: the gradient stores' config.yaml "
            "names the trainer's output_dir %s (save the model there with "
            "trainer.save_model() before serving them)", ref,
        )
    tok = _name_of(processing_class)
    tokenizer = _located(tok) if tok and _located(tok) != ref else ""
    return IndexModelConfig(model=ref, tokenizer=tokenizer, precision=_precision(model))  # type: ignore[arg-type]
