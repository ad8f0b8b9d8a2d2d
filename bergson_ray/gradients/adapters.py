"""Which modules of a PEFT-wrapped model are the adapter's (bergson tracks only those).

A model wrapped by ``peft`` (a fresh ``--peft_init_kwargs`` adapter or an adapter
directory given as ``--model``) keeps every frozen base ``Linear`` under its base model
next to the adapter's own small ``Linear`` layers (LoRA's ``lora_A`` / ``lora_B``).
Attribution to a fine-tuned adapter is about the adapter's parameters, so, as bergson
does, only the modules that hold the adapter's saved weights are tracked. Their names are
relative to ``model.base_model`` like every other module name
(``model.gpt_neox.layers.0.attention.query_key_value.lora_A.default``).

Pure: works on any model object, the meta-device skeleton included; ``peft`` is imported
only when the model is a PEFT model.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)


def is_peft_model(model: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (it carries the adapters' ``peft_config`` mapping)."""
    return isinstance(getattr(model, "peft_config", None), dict) and hasattr(model, "base_model")


def adapter_module_names(model: nn.Module) -> set[str] | None:
    """Names (relative to ``model.base_model``) of the modules holding the adapter's
    weights, or None for a model without adapters.

    The adapter's saved state dict names its weights (``base_model.model.<path>.lora_A.weight``);
    each becomes the module ``model.<path>.lora_A.<adapter name>`` for every adapter.
    Weights that are not a module's (LoRA's embedding ``ParameterDict`` entries) are
    skipped with a log line, as bergson skips them.
    """
    if not is_peft_model(model):
        return None
    from peft import get_peft_model_state_dict

    base = model.base_model
    found: set[str] = set()
    keys = list(get_peft_model_state_dict(model))
    for adapter in model.peft_config:
        for key in keys:
            stem = key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key
            name = f"{stem}.{adapter}".removeprefix("base_model.")
            try:
                base.get_submodule(name)
            except AttributeError:
                log.info("adapter weight %s is not a module's; it is not tracked", key)
                continue
            found.add(name)
    return found
