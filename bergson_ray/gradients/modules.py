"""Which modules get per-example gradients, and how their weights are oriented.

Like bergson we walk ``model.base_model`` (so the LM head of a standard HF causal
LM is not collected) and keep every ``nn.Linear`` and HF ``Conv1D``. Names are
relative to the base model (``layers.0.attention.query_key_value``) so stores from
both libraries use the same module keys.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from ..config import GradientConfig
from ..errors import BadInputError

try:  # HF GPT-2 style layers store their weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment,misc]


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(O, I)``: out and in features whatever the layer's storage orientation."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if Conv1D and isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape
        return int(out_f), int(in_f)
    raise TypeError(f"unsupported module type {type(module).__name__}")


def weight_as_out_in(module: nn.Module):
    """The weight tensor viewed as ``[O, I]`` (a transpose view for Conv1D)."""
    w = module.weight
    return w.t() if (Conv1D and isinstance(module, Conv1D)) else w


def base_model(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def _globs(value: str | list[str] | None) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [v.strip() for v in value if v.strip()]


def find_target_modules(model: nn.Module, cfg: GradientConfig) -> dict[str, nn.Module]:
    """Supported modules under the base model, after include/exclude globs.

    Raises :class:`BadInputError` when a glob matches nothing (a typo would
    otherwise silently produce an empty or unfiltered store).
    """
    candidates = {
        name: mod for name, mod in base_model(model).named_modules() if name and is_supported(mod)
    }
    if not candidates:
        raise BadInputError(
            f"{type(model).__name__} has no nn.Linear or Conv1D layers under its base model"
        )
    include, exclude = _globs(cfg.modules), _globs(cfg.filter_modules)
    for globs, kind in ((include, "--modules"), (exclude, "--filter_modules")):
        for g in globs:
            if not any(fnmatch.fnmatchcase(n, g) for n in candidates):
                sample = ", ".join(list(candidates)[:6])
                raise BadInputError(
                    f"{kind} pattern {g!r} matches no module; module names look like: {sample}, ..."
                )
    out = {
        n: m
        for n, m in candidates.items()
        if (not include or any(fnmatch.fnmatchcase(n, g) for g in include))
        and not any(fnmatch.fnmatchcase(n, g) for g in exclude)
    }
    if not out:
        raise BadInputError("module filters exclude every module; nothing would be collected")
    for name in cfg.split_attention_modules:
        if name not in out:
            raise BadInputError(f"--split_attention_modules names unknown module {name!r}")
    return out
