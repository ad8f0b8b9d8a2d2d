"""Output token influence (``score --token_influence output``), pure torch.

The gradient token influence of position ``t`` is the per-token gradient there: ``t``'s
effect on the loss of every later token. The *output* token influence (Grosse et al.
2023, bergson's ``token_influence="output"``) instead scores the loss on token ``t + 1``
alone: ``d/de loss_{t+1}(theta + e q) = grad loss_{t+1} . q`` at ``e = 0``, the rate at
which that one loss term changes as the weights move along the query ``q``.

Forward-mode differentiation (``torch.func.jvp``) gives every term's rate for one query
column in one forward pass, so a batch costs one pass per query column. Each term carries
the weight the gradient path gives it (``1 / count`` with ``--loss_reduction mean``,
times the document's advantage), so a document's rates sum to its gradient's inner
product with the query: both kinds of per-token row sum to the per-document score.

The query must be unprojected: its block for module ``m`` is ``[O, I]`` row-major, with
the bias as a trailing column when the gradients carry one (``[O, I + 1]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInputError
from .losses import token_log_odds_loss
from .modules import weight_shape

try:  # HF GPT-2 style layers store their weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class ModuleDirection:
    """Where one module's query block moves the model's parameters."""

    block: torch.Tensor
    """``[Q, O, I(+1)]``: the module's slice of every query column."""
    weight: str
    """Name of the weight parameter in ``model.named_parameters()``."""
    bias: str | None
    """Name of the bias parameter when the block carries it."""
    transposed: bool
    """The weight is stored ``[I, O]`` (HF ``Conv1D``)."""


def query_directions(
    model: nn.Module,
    modules: dict[str, nn.Module],
    grad_sizes: dict[str, int],
    query: torch.Tensor,
) -> list[ModuleDirection]:
    """Split the ``[Q, D]`` query (laid out per ``grad_sizes``) into per-module directions.

    ``modules`` maps the scored module names to the modules. A block that is not the
    module's full ``O x I`` (or ``O x (I + 1)``) is a projected query: refused, as is a
    parameter two modules share (moving it would move both).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    seen: set[str] = set()
    out: list[ModuleDirection] = []
    start = 0
    for name, size in grad_sizes.items():
        mod = modules[name]
        o, i = weight_shape(mod)
        if size not in (o * i, o * (i + 1)):
            raise BadInputError(
                f"--token_influence output needs an unprojected query: {name} has {size} "
                f"values per query, its weight {o * i}; rebuild the query with --projection_dim 0"
            )
        has_bias = size == o * (i + 1)
        if has_bias and getattr(mod, "bias", None) is None:
            raise BadInputError(f"the query carries a bias column for {name}, which has no bias")
        block = query[:, start : start + size].reshape(len(query), o, -1)
        start += size
        weight = names[id(mod.weight)]
        bias = names[id(mod.bias)] if has_bias else None
        for param in (weight, bias):
            if param is None:
                continue
            if param in seen:
                raise BadInputError(
                    f"--token_influence output cannot score {param}: two scored modules share it"
                )
            seen.add(param)
        transposed = bool(Conv1D) and isinstance(mod, Conv1D)
        out.append(ModuleDirection(block, weight, bias, transposed))
    if not out:
        raise BadInputError("the query has no module in common with the scored ones")
    return out


def _tangent(directions: list[ModuleDirection], params: dict[str, torch.Tensor], q: int):
    """Query column ``q`` as a tangent for every parameter it moves."""
    tangent: dict[str, torch.Tensor] = {}
    for d in directions:
        weight = params[d.weight]
        v = d.block[q].to(weight.device, weight.dtype)
        i = v.shape[1] - int(d.bias is not None)
        w = v[:, :i]
        tangent[d.weight] = (w.t() if d.transposed else w).reshape(weight.shape)
        if d.bias is not None:
            tangent[d.bias] = v[:, i].reshape(params[d.bias].shape)
    return tangent


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, loss_fn: str, label_smoothing: float
) -> torch.Tensor:
    """``[N, S - 1]`` loss of every next-token term (0 where ``labels[s + 1] == -100``)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    if loss_fn == "log_odds":
        return token_log_odds_loss(shift_logits, shift_labels)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(shift_labels.shape)


def term_weights(labels: torch.Tensor, reduction: str, advantage: torch.Tensor | None) -> torch.Tensor:
    """``[N, S - 1]`` weight of each loss term in the document loss the gradients use."""
    mask = (labels[:, 1:] != -100).float()
    weights = torch.ones_like(mask)
    if reduction == "mean":
        weights = weights / mask.sum(dim=1, keepdim=True).clamp_min(1)
    if advantage is not None:
        weights = weights * advantage.to(weights.device, weights.dtype)[:, None]
    return weights


def output_token_rates(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    directions: list[ModuleDirection],
    *,
    loss_fn: str = "ce",
    reduction: str = "sum",
    label_smoothing: float = 0.0,
    advantage: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rates [N, S - 1, Q], loss [N])``: how fast each weighted loss term changes along
    each query column, and each document's (unweighted) loss as the gradient path reports
    it. Term ``t`` is the loss on token ``t + 1``."""
    from torch.func import functional_call, jvp

    weights = term_weights(labels, reduction, advantage)
    params = {n: p.detach() for n, p in model.named_parameters()}
    moved = sorted({n for d in directions for n in (d.weight, d.bias) if n is not None})

    def losses(sub: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(model, sub, (input_ids,)).logits
        return token_losses(logits, labels, loss_fn, label_smoothing)

    rates = []
    primal = None
    with torch.no_grad():
        for q in range(len(directions[0].block)):
            tangent = _tangent(directions, params, q)
            primal, rate = jvp(losses, ({n: params[n] for n in moved},), ({n: tangent[n] for n in moved},))
            rates.append(rate.float() * weights)
    assert primal is not None
    loss = primal.float().sum(dim=1)
    if reduction == "mean":
        loss = loss / (labels[:, 1:] != -100).sum(dim=1).clamp_min(1)
    return torch.stack(rates, dim=-1), loss


def use_eager_attention(model: nn.Module) -> None:
    """Fused attention kernels have no forward-mode derivative: switch to eager."""
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        try:
            setter("eager")
            return
        except (ValueError, TypeError, AttributeError):  # older transformers / custom models
            pass
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "_attn_implementation"):
        config._attn_implementation = "eager"
