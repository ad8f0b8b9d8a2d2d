"""Fused mixture-of-experts layers, exposed as one linear module per expert projection.

transformers 5 keeps every expert of an MoE layer (Mixtral, Qwen-MoE, OLMoE, gpt-oss,
...) in one experts module holding 3-D parameters: ``gate_up_proj`` (or ``up_proj``)
``[E, 2F, H]`` and ``down_proj`` ``[E, H, F]`` (``[E, in, out]`` when the class sets
``is_transposed``). Those are not ``nn.Linear`` layers, so without help the module
taps see only attention and routers, a few percent of the weights.

:func:`expand_experts` gives each expert ``e`` of a matching experts module two child
modules, ``expert_<e>.<up name>`` and ``expert_<e>.down_proj`` (bergson's names, so the
store keys and projection seeds agree), each an :class:`ExpertProjection`: a view of
slice ``e`` of the fused parameter that behaves like a linear layer. It then replaces
the module's forward with :func:`routed_forward`, which runs expert by expert over the
tokens the router sent to it. The parameters are untouched (``state_dict`` is the same)
and the output equals the fused forward's up to float summation order.

An expert sees only its routed tokens, packed per document into ``[N, W, *]`` with
``W`` the largest count any document sent it (zero-padded). Its :class:`RowLayout`
maps those rows back to sequence positions; the taps (``hooks.py``) use it to hand
consumers the usual ``a [N, S, I]`` and ``g [N, S, O]``, zero at the positions routed
elsewhere, so per-example sums, per-token rows and Hessian statistics need no special
case. The gradient of expert ``e``'s slice for one document is therefore
``sum over routed positions of g_s a_s^T``, and zero when the document sent it nothing.

Pure torch: no Ray, no I/O.
"""

from __future__ import annotations

import fnmatch
import re
import types
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BadInputError

DOCS_ATTR = "_bergson_ray_num_docs"
"""Set on an expanded experts module by a pre-hook on its parent: documents in the batch.

The experts module only receives the flattened ``[N*S, H]`` hidden states, and the
per-document packing needs ``N``."""

EXPANDED_ATTR = "_bergson_ray_expanded"
HOOKED_ATTR = "_bergson_ray_block_hooked"


@dataclass(frozen=True)
class RowLayout:
    """Where each row of an expert's packed ``[N, W, *]`` input came from.

    ``doc``, ``col`` and ``pos`` list the real rows: row ``(doc[r], col[r])`` holds the
    token at sequence position ``pos[r]`` of document ``doc[r]``; every other row is padding.
    """

    num_docs: int
    seq_len: int
    width: int
    doc: torch.Tensor
    col: torch.Tensor
    pos: torch.Tensor

    @classmethod
    def of(cls, routed: torch.Tensor) -> RowLayout:
        """Layout of the positions marked in ``routed [N, S]`` (bool), in sequence order."""
        n, s = routed.shape
        doc, pos = routed.nonzero(as_tuple=True)
        col = routed.long().cumsum(1).sub(1)[doc, pos]
        # At least one (padding) row: the projections then run, and their taps fire,
        # for an expert that no document used.
        width = max(int(routed.sum(1).max()) if n else 0, 1)
        return cls(n, s, width, doc, col, pos)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, S, D]`` -> ``[N, W, D]``: each document's routed positions, zero-padded."""
        out = x.new_zeros(self.num_docs, self.width, x.shape[-1])
        return out.index_put((self.doc, self.col), x[self.doc, self.pos])

    def rows(self, y: torch.Tensor) -> torch.Tensor:
        """``y [N, W, D]`` -> ``[R, D]``: the real rows, in the order of ``tokens``."""
        return y[self.doc, self.col]

    @property
    def tokens(self) -> torch.Tensor:
        """Flat token index (``doc * S + pos``) of each real row."""
        return self.doc * self.seq_len + self.pos

    def routed(self) -> torch.Tensor:
        """``[N, S]`` bool: the positions the router sent to this expert.

        Hessian statistics divide an expert's sums by these positions' count (bergson's
        convention), which a zero test on the activations could not tell apart from a
        routed token whose input happens to be zero."""
        out = torch.zeros(self.num_docs, self.seq_len, dtype=torch.bool, device=self.pos.device)
        out[self.doc, self.pos] = True
        return out

    def to_sequence(self, y: torch.Tensor) -> torch.Tensor:
        """``y [N, W, D]`` -> ``[N, S, D]``, zero at positions this expert did not see."""
        out = y.new_zeros(self.num_docs, self.seq_len, y.shape[-1])
        out[self.doc, self.pos] = y[self.doc, self.col]
        return out


class ExpertProjection(nn.Module):
    """Slice ``index`` of a fused expert parameter, called like a linear layer.

    ``weight`` and ``bias`` are read from the owning experts module at every call (no
    parameters are registered here, so ``state_dict`` and sharding are unchanged).
    ``row_layout`` is set by :func:`routed_forward` for the duration of each call.
    """

    def __init__(self, experts: nn.Module, param: str, index: int):
        super().__init__()
        # Kept out of _modules: the owner is this module's parent, not its child.
        self.__dict__["_owner"] = experts
        self.param = param
        self.index = index
        self.transposed = bool(getattr(experts, "is_transposed", False))
        rows, cols = getattr(experts, param).shape[1:]
        self.in_features, self.out_features = (rows, cols) if self.transposed else (cols, rows)
        self.row_layout: RowLayout | None = None

    @property
    def weight(self) -> torch.Tensor:
        """This expert's slice, in the fused parameter's orientation."""
        return getattr(self._owner, self.param)[self.index]

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self._owner, f"{self.param}_bias", None)
        return None if b is None else b[self.index]

    def weight_out_in(self) -> torch.Tensor:
        """The slice viewed as ``[out, in]``."""
        return self.weight.t() if self.transposed else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight if self.transposed else x @ self.weight.t()
        b = self.bias
        return y if b is None else y + b

    def extra_repr(self) -> str:
        return f"{self.param}[{self.index}], in={self.in_features}, out={self.out_features}"


def projection_params(experts: nn.Module) -> tuple[str, str]:
    """Names of the fused (up, down) parameters: ``gate_up_proj`` when the gate is fused in."""
    return ("gate_up_proj" if hasattr(experts, "gate_up_proj") else "up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """An experts module keeping its experts in 3-D parameters (transformers 5 layout)."""
    if isinstance(module, ExpertProjection):
        return False
    params = [getattr(module, p, None) for p in projection_params(module)]
    return all(isinstance(p, nn.Parameter) and p.ndim == 3 for p in params)


def fused_expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every fused experts module of ``model``, by its name in ``model.named_modules()``."""
    return {n: m for n, m in model.named_modules() if n and is_fused_experts(m)}


def suggest_glob(names) -> str:
    """A ``--moe_experts`` value covering ``names`` (layer numbers become ``*``)."""
    globs = dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names)
    return ",".join(globs)


def routed_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts module's forward, one :class:`ExpertProjection` call at a time.

    Same result as transformers' fused forward: ``sum over the token's top-k experts e
    of weight_e * down_e(act(up_e(x)))``. Routing indices outside ``[0, E)`` (expert
    parallel padding) select no expert, as there.
    """
    shape = hidden_states.shape
    flat = hidden_states.reshape(-1, shape[-1])
    num_tokens = flat.shape[0]
    n = shape[0] if hidden_states.ndim == 3 else getattr(self, DOCS_ATTR, None)
    if n is None:
        raise BadInputError(
            f"the block around {type(self).__name__} got no [N, S, H] hidden states, so "
            "--moe_experts cannot tell its documents apart"
        )
    if n <= 0 or num_tokens % n:
        raise RuntimeError(f"{num_tokens} tokens do not split into {n} documents")
    seq = num_tokens // n
    index = top_k_index.reshape(num_tokens, -1)
    weights = top_k_weights.reshape(num_tokens, -1)
    up_name, down_name = projection_params(self)
    gated = up_name == "gate_up_proj"
    post_norm = self.post_expert_norm if getattr(self, "has_post_expert_norm", False) else None
    by_doc = flat.reshape(n, seq, -1)
    out = torch.zeros_like(flat)
    for e in range(getattr(self, up_name).shape[0]):
        hit = index == e  # [T, k]
        layout = RowLayout.of(hit.any(-1).view(n, seq))
        expert = getattr(self, f"expert_{e}")
        up, down = getattr(expert, up_name), getattr(expert, down_name)
        up.row_layout = down.row_layout = layout
        try:
            h = up(layout.pack(by_doc))
            h = _gate(self, h) if gated else self.act_fn(h)
            h = down(h)
        finally:
            up.row_layout = down.row_layout = None
        if post_norm is not None:
            h = post_norm(h)
        tokens = layout.tokens
        gate = (weights * hit).sum(-1)[tokens, None]
        out = out.index_add(0, tokens, (layout.rows(h) * gate).to(out.dtype))
    return out.view(shape)


def _gate(experts: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up`` of a fused gate/up output; the class's own rule when it has one
    (gpt-oss interleaves and clamps)."""
    apply = getattr(experts, "_apply_gate", None)
    if apply is not None:
        return apply(h)
    gate, up = h.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


@dataclass(frozen=True)
class FlatRows:
    """Layout of a module inside an MoE block that receives flattened ``[N*S, *]`` rows.

    Some blocks (Qwen2-MoE's shared expert and its gate) call ordinary linears on the
    flattened hidden states; the taps view those rows as ``[N, S, *]`` again.
    """

    num_docs: int
    seq_len: int

    def to_sequence(self, y: torch.Tensor) -> torch.Tensor:
        if y.ndim == 2 and y.shape[0] == self.num_docs * self.seq_len:
            return y.view(self.num_docs, self.seq_len, -1)
        return y


class _BlockHooks:
    """Hooks on an MoE block (the experts module's parent) that tell its insides the batch shape.

    Before the block runs: the experts module learns ``N`` (it only receives ``[N*S, H]``)
    and every other linear inside the block gets a :class:`FlatRows` layout; after it,
    the layouts are cleared.
    """

    def __init__(self, block: nn.Module, experts: nn.Module):
        self.experts = experts
        inside = {id(m) for m in experts.modules()}
        self.linears = [
            m for m in block.modules() if isinstance(m, nn.Linear) and id(m) not in inside
        ]

    def before(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        x = next(
            (v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim == 3),
            None,
        )
        setattr(self.experts, DOCS_ATTR, None if x is None else x.shape[0])
        if x is not None:
            for m in self.linears:
                m.row_layout = FlatRows(x.shape[0], x.shape[1])

    def after(self, *_args) -> None:
        for m in self.linears:
            m.row_layout = None


def prepare_moe_blocks(model: nn.Module) -> None:
    """Install :class:`_BlockHooks` on the block of every fused experts module (once).

    Needed for ``--moe_experts``, and harmless without it: it lets the taps read the
    linears that a block calls on flattened rows (a shared expert) as ``[N, S, *]``.
    """
    for name, experts in fused_expert_modules(model).items():
        if getattr(experts, HOOKED_ATTR, False):
            continue
        block = model.get_submodule(name.rpartition(".")[0])
        hooks = _BlockHooks(block, experts)
        block.register_forward_pre_hook(hooks.before, with_kwargs=True)
        block.register_forward_hook(hooks.after)
        setattr(experts, HOOKED_ATTR, True)


def expand_experts(model: nn.Module, patterns: str) -> list[str]:
    """Expose every expert projection of the experts modules ``patterns`` names.

    ``patterns``: comma-separated globs over ``model.named_modules()`` names (bergson's
    form, e.g. ``model.layers.*.mlp.experts``); names relative to the base model
    (``layers.*.mlp.experts``) are accepted too. Idempotent. Returns the exposed modules'
    names (``model.named_modules()`` form). Raises :class:`BadInputError` when a glob
    matches nothing or matches a module without fused expert parameters.
    """
    globs = [g.strip() for g in patterns.split(",") if g.strip()]
    base = getattr(model, "base_model", model)
    prefix = next((n for n, m in model.named_modules() if m is base), "")
    fused = fused_expert_modules(model)
    used: set[str] = set()
    matched: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if (
            not name
            or isinstance(mod, ExpertProjection)
            or getattr(mod, "_bergson_ray_expert", False)
        ):
            continue  # our own additions never count as matches
        rel = name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else None
        hits = [
            g
            for g in globs
            if fnmatch.fnmatchcase(name, g) or (rel and fnmatch.fnmatchcase(rel, g))
        ]
        if not hits:
            continue
        used.update(hits)
        if name not in fused:
            raise BadInputError(
                f"--moe_experts pattern {hits[0]!r} matches {name!r} ({type(mod).__name__}), "
                "which holds no fused 3-D expert parameters; " + _hint(fused)
            )
        matched[name] = mod
    for g in globs:
        if g not in used:
            raise BadInputError(f"--moe_experts pattern {g!r} matches no module; " + _hint(fused))
    names: list[str] = []
    for name, experts in matched.items():
        up_name, down_name = projection_params(experts)
        count = getattr(experts, up_name).shape[0]
        names += [f"{name}.expert_{e}.{p}" for e in range(count) for p in (up_name, down_name)]
        if getattr(experts, EXPANDED_ATTR, False):
            continue
        for e in range(count):
            holder = nn.Module()
            holder._bergson_ray_expert = True
            for p in (up_name, down_name):
                holder.add_module(p, ExpertProjection(experts, p, e))
            experts.add_module(f"expert_{e}", holder)
        experts.forward = types.MethodType(routed_forward, experts)
        setattr(experts, EXPANDED_ATTR, True)
    prepare_moe_blocks(model)
    return names


def _hint(fused: dict[str, nn.Module]) -> str:
    if not fused:
        return "this model has no fused MoE experts modules"
    return f"its fused experts modules are matched by {suggest_glob(fused)!r}"
