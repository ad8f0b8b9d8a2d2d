"""Which modules get per-example gradients, and how their weights are oriented.

Like bergson we walk ``model.base_model`` (so the LM head of a standard HF causal
LM is not collected) and keep every ``nn.Linear`` and HF ``Conv1D``. Names are
relative to the base model (``layers.0.attention.query_key_value``) so stores from
both libraries use the same module keys.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

from torch import nn

from ..config import GradientConfig
from ..errors import BadInputError
from .adapters import adapter_module_names
from .moe import (
    ExpertProjection,
    expand_experts,
    fused_expert_modules,
    prepare_moe_blocks,
    suggest_glob,
)

try:  # HF GPT-2 style layers store their weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D, ExpertProjection))


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(O, I)``: out and in features whatever the layer's storage orientation."""
    if isinstance(module, (nn.Linear, ExpertProjection)):
        return module.out_features, module.in_features
    if Conv1D and isinstance(module, Conv1D):
        in_f, out_f = module.weight.shape
        return int(out_f), int(in_f)
    raise TypeError(f"unsupported module type {type(module).__name__}")


def weight_as_out_in(module: nn.Module):
    """The weight tensor viewed as ``[O, I]`` (a transpose view for Conv1D)."""
    if isinstance(module, ExpertProjection):
        return module.weight_out_in()
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
    otherwise silently produce an empty or unfiltered store). With ``moe_experts``
    the named fused experts modules are first expanded in place (``moe.py``), so each
    expert's projections are candidates (``layers.0.mlp.experts.expert_3.down_proj``).
    """
    if getattr(cfg, "moe_experts", ""):
        expand_experts(model, cfg.moe_experts)
    prepare_moe_blocks(model)  # shared experts fed flattened rows read as [N, S, *]
    candidates = {
        name: mod for name, mod in base_model(model).named_modules() if name and is_supported(mod)
    }
    adapters = adapter_module_names(model)  # a PEFT model: only the adapter's modules
    if adapters is not None:
        candidates = {n: m for n, m in candidates.items() if n in adapters}
        if not candidates:
            raise BadInputError(
                "the PEFT adapter has no Linear modules to attribute to (LoRA-style adapters only)"
            )
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


# -- coverage --------------------------------------------------------------------------
LOW_COVERAGE = 0.5
"""Below this share of the weights the filters allow, a run warns about what is untracked."""

EXCLUDED = "excluded by --modules / --filter_modules"

_LOGGED: set[str] = set()


@dataclass(frozen=True)
class Coverage:
    """How much of the model the tracked modules' gradients cover (parameter counts)."""

    tracked: int
    """Weights (and attributed biases) of the tracked modules."""
    total: int
    """Every parameter of the model except the input and output embeddings."""
    untracked: dict[str, int]
    """The rest by kind (a short description, with the flag that would track it), largest first."""

    @property
    def share(self) -> float:
        return self.tracked / self.total if self.total else 1.0

    @property
    def share_of_allowed(self) -> float:
        """The share among the weights ``--modules`` / ``--filter_modules`` leave in."""
        allowed = self.total - self.untracked.get(EXCLUDED, 0)
        return self.tracked / allowed if allowed else 1.0

    @property
    def low(self) -> bool:
        """Most of what the filters allow is untracked (so the user did not choose it)."""
        return self.share_of_allowed < LOW_COVERAGE

    def message(self, num_modules: int) -> str:
        msg = (
            f"gradients cover {self.share:.1%} of the model's {self.total:,} parameters "
            f"outside the embeddings ({num_modules} modules)"
        )
        if self.untracked:
            parts = (f"{v / self.total:.1%} {k}" for k, v in self.untracked.items())
            msg += "; untracked: " + ", ".join(parts)
        return msg


def parameter_coverage(
    model: nn.Module, modules: dict[str, nn.Module], include_bias: bool = False
) -> Coverage:
    """Share of the model's parameters that ``modules`` (from :func:`find_target_modules`) track.

    Embedding lookups are never attributed (nor is the LM head, outside the base model),
    so the input and output embeddings are left out of the total. Works on the meta device.
    """
    skip = set()
    for get in ("get_input_embeddings", "get_output_embeddings"):
        emb = getattr(model, get, lambda: None)()
        if emb is not None:
            skip.update(id(p) for p in emb.parameters())
    covered: dict[int, int] = {}  # parameter id -> tracked elements of it
    for mod in modules.values():
        if isinstance(mod, ExpertProjection):  # a slice of the fused parameter
            weight = getattr(mod._owner, mod.param)
            bias = getattr(mod._owner, f"{mod.param}_bias", None)
        else:
            weight, bias = mod.weight, getattr(mod, "bias", None)
        o, i = weight_shape(mod)
        covered[id(weight)] = covered.get(id(weight), 0) + o * i
        if include_bias and bias is not None:
            covered[id(bias)] = covered.get(id(bias), 0) + o
    fused = fused_expert_modules(model)
    fused_params = {id(p) for m in fused.values() for p in m.parameters(recurse=False)}
    unexpanded = f"fused MoE experts (pass --moe_experts '{suggest_glob(fused)}')"
    tracked, total, untracked, example = 0, 0, {}, {}
    seen: set[int] = set()
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
        done = min(covered.get(id(p), 0), p.numel())
        tracked += done
        if done == p.numel():
            continue
        owner_name = pname.rpartition(".")[0]
        owner = model.get_submodule(owner_name) if owner_name else model
        if id(p) in fused_params and not hasattr(owner, "expert_0"):
            kind = unexpanded
        elif id(p) in fused_params or (is_supported(owner) and p is owner.weight):
            kind = EXCLUDED
        elif is_supported(owner):
            kind = "biases (pass --include_bias)"
        else:
            kind = "other"
        untracked[kind] = untracked.get(kind, 0) + p.numel() - done
        example.setdefault(kind, pname)
    if "other" in untracked:
        untracked[f"other, e.g. {example['other']}"] = untracked.pop("other")
    ordered = dict(sorted(untracked.items(), key=lambda kv: -kv[1]))
    return Coverage(tracked, total, ordered)


def log_coverage(
    model: nn.Module,
    modules: dict[str, nn.Module],
    include_bias: bool = False,
    *,
    once: bool = True,
) -> Coverage:
    """Log the coverage at INFO, or at WARNING when it is low (:attr:`Coverage.low`).

    ``once``: skip a message this process already logged (a command that plans
    several stages on the same model reports it once).
    """
    cov = parameter_coverage(model, modules, include_bias)
    msg = cov.message(len(modules))
    if not (once and msg in _LOGGED):
        _LOGGED.add(msg)
        log.log(logging.WARNING if cov.low else logging.INFO, msg)
    return cov
