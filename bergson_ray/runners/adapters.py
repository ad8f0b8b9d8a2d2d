"""PEFT adapters: a saved adapter directory as ``--model``, or a fresh ``--peft_init_kwargs``
adapter, on top of the base causal LM (bergson's ``setup_model_and_peft``).

* An adapter directory (``adapter_config.json`` inside) names its base model
  (``base_model_name_or_path``); the base is loaded as usual and the adapter's saved
  weights put on top. Everything that needs the model's config or tokenizer (the
  driver's layout, token counts) reads the base's: :func:`base_model_name`.
* ``--peft_init_kwargs k=v,...`` wraps the base in a new adapter built from those
  ``peft`` config arguments (``LoraConfig`` unless ``peft_type=...``; ``a|b`` is a list).
  bergson draws the new adapter from the process's random state; here every worker (and a
  later query run) draws it from the same fixed seed, so all of them hold the same adapter.

Either way only the adapter's modules are tracked (``gradients/adapters.py``). The same
wrapping is applied to the meta-device skeleton the driver plans a store's layout from
(:func:`attach_adapter` with ``meta=True``), which needs no adapter weights.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError, load_error
from ..utils.kv import parse_kv

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
FRESH_ADAPTER_SEED = 0
"""Seed a fresh ``--peft_init_kwargs`` adapter is drawn from (the same in every worker)."""

PEFT_MISSING = "PEFT adapters need the peft package: pip install 'bergson_ray[peft]'"


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise BadInputError(PEFT_MISSING) from None


@functools.lru_cache(maxsize=64)
def adapter_config(name: str, revision: str | None = None) -> dict[str, Any] | None:
    """The parsed ``adapter_config.json`` of ``name`` (a local dir or a hub id), or None
    when ``name`` is not a PEFT adapter."""
    local = Path(os.path.expanduser(name))
    if local.is_dir():
        path = local / ADAPTER_CONFIG
        if not path.is_file():
            return None
    elif local.exists() or name.startswith(("/", "./", "../", "~")):
        return None
    else:  # a hub id: only a repository holding adapter_config.json is an adapter
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(name, ADAPTER_CONFIG, revision=revision))
        except Exception:  # noqa: BLE001 - missing file, offline, no such repo: not an adapter
            return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BadInputError(f"{path} is not a readable adapter config: {err}") from None
    if not isinstance(raw, dict):
        raise BadInputError(f"{path} is not a JSON object of adapter settings")
    return raw


def base_model_name(name: str, revision: str | None = None) -> str:
    """``name`` itself, or the base model an adapter at ``name`` was trained on."""
    cfg = adapter_config(name, revision)
    if cfg is None:
        return name
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise BadInputError(
            f"the PEFT adapter {name} does not name its base model (base_model_name_or_path "
            f"in {ADAPTER_CONFIG}); set it there"
        )
    return str(base)


def init_kwargs(text: str) -> tuple[str, dict[str, Any]]:
    """``--peft_init_kwargs`` as ``(peft_type, config kwargs)``; LORA unless it says otherwise."""
    kwargs = parse_kv(text, "--peft_init_kwargs")
    peft_type = str(kwargs.pop("peft_type", "LORA")).upper()
    if "target_modules" in kwargs and isinstance(kwargs["target_modules"], str):
        # peft reads a bare string as one regular expression over full module names, so
        # 'query_key_value' would match nothing; as a one-item list it matches by suffix
        value = kwargs["target_modules"]
        if value != "all-linear" and not any(c in value for c in "*?[]()|^$\\+"):
            kwargs["target_modules"] = [value]
    return peft_type, kwargs


def fresh_peft_config(text: str):
    """The ``peft`` config ``--peft_init_kwargs`` describes, or one clear sentence."""
    _require_peft()
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type, kwargs = init_kwargs(text)
    try:
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(peft_type)]
    except (ValueError, KeyError):
        raise BadInputError(f"--peft_init_kwargs: unknown peft_type {peft_type!r}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise BadInputError(f"--peft_init_kwargs: {err}") from None


def saved_peft_config(name: str, revision: str | None = None):
    """The ``peft`` config of the adapter at ``name`` (no weights)."""
    _require_peft()
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(os.path.expanduser(name), revision=revision)
    except Exception as err:  # noqa: BLE001 - peft raises ValueError, OSError, TypeError
        raise load_error("PEFT adapter", name, err) from None


def attach_adapter(model, name: str, peft_init_kwargs: str, *, meta: bool = False):
    """``model`` wrapped in the adapter ``--model`` names or ``--peft_init_kwargs`` asks
    for; ``model`` itself when neither applies.

    ``meta``: ``model`` is the driver's meta-device skeleton; only the adapter's modules
    (names and shapes) are needed, so a saved adapter's weights are not read. As in
    bergson, the adapter is looked up without ``--revision`` (that names the base's).
    """
    saved = adapter_config(name)
    if saved is not None and peft_init_kwargs:
        raise BadInputError(
            f"--peft_init_kwargs makes a new adapter, but --model {name} is already a PEFT "
            "adapter; drop one of them"
        )
    if saved is None and not peft_init_kwargs:
        return model
    _require_peft()
    from peft import PeftModel, get_peft_model

    if peft_init_kwargs:
        config = fresh_peft_config(peft_init_kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(FRESH_ADAPTER_SEED)
            return _wrap(get_peft_model, model, config, "--peft_init_kwargs")
    if meta:
        config = saved_peft_config(name)
        config.inference_mode = True
        return _wrap(get_peft_model, model, config, name)
    try:
        return PeftModel.from_pretrained(
            model,
            os.path.expanduser(name),
            is_trainable=False,
            autocast_adapter_dtype=False,
        )
    except Exception as err:  # noqa: BLE001 - shape mismatches, missing files, ...
        raise load_error("PEFT adapter", name, err) from None


def _wrap(get_peft_model, model, config, what: str):
    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as err:  # e.g. target modules not found
        raise BadInputError(f"{what}: {err}") from None
