"""Per-example (and per-token) gradient rows from module activations and output grads.

For a linear layer the weight gradient of one document is ``G = Σ_s g_s a_sᵀ``.
With a two-sided projection we never form ``G``: the forward tap stores
``ã_s = R a_s`` (``[N, S, p]``), the backward tap forms ``g̃_s = L g_s`` and the
stored block is ``P = Σ_s g̃_s ã_sᵀ = L G Rᵀ`` (``p x p``). Cost is linear in
``O + I`` instead of ``O · I``.

Adafactor normalization is folded into ``a`` and ``g`` (it commutes with the
projection); Adam normalization is elementwise on ``G``, so that path forms the
full per-example gradient first. Bias gradients are an extra input column
(``[O, I+1]``, bias last), handled without materializing it when projecting.

All math runs in fp32 whatever the model's precision; the engine casts rows to
the store dtype at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import GradientConfig
from ..errors import BadInputError
from .modules import weight_shape
from .normalizers import AdafactorNormalizer, AdamNormalizer, Normalizer
from .projection import ProjectionCache


@dataclass(frozen=True)
class Block:
    """One stored block: a whole module, or one attention head of it."""

    name: str  # store key: module name, or "<module>.head_<h>"
    module: str
    lo: int  # output rows [lo, hi) of the module
    hi: int
    in_features: int
    bias: bool

    @property
    def out_features(self) -> int:
        return self.hi - self.lo

    @property
    def full_size(self) -> int:
        return self.out_features * (self.in_features + int(self.bias))


def plan_blocks(modules: dict[str, nn.Module], cfg: GradientConfig) -> dict[str, list[Block]]:
    """Blocks per module, in module order, with attention heads expanded in place."""
    out: dict[str, list[Block]] = {}
    for name, mod in modules.items():
        o, i = weight_shape(mod)
        bias = cfg.include_bias and getattr(mod, "bias", None) is not None
        if name in cfg.split_attention_modules:
            heads, size = cfg.attention.num_heads, cfg.attention.head_size
            if cfg.attention.head_dim != 2:
                raise BadInputError("only attention.head_dim=2 (output dimension) is supported")
            if heads <= 0 or heads * size != o:
                raise BadInputError(
                    f"{name}: num_heads x head_size = {heads} x {size} must equal out_features {o}"
                )
            out[name] = [
                Block(f"{name}.head_{h}", name, h * size, (h + 1) * size, i, bias)
                for h in range(heads)
            ]
        else:
            out[name] = [Block(name, name, 0, o, i, bias)]
    return out


class PerExampleCollector:
    """Tap consumer producing one row block per document (or per token) per module."""

    def __init__(
        self,
        modules: dict[str, nn.Module],
        cfg: GradientConfig,
        normalizers: dict[str, Normalizer] | None = None,
    ):
        self.cfg = cfg
        self.p = cfg.projection_dim
        self.global_proj = cfg.projection_target == "global"
        if self.global_proj and self.p <= 0:
            raise BadInputError("projection_target=global needs projection_dim > 0")
        self.blocks = plan_blocks(modules, cfg)
        self.normalizers = normalizers or {}
        unknown = set(self.normalizers) - set(modules)
        if unknown:
            raise BadInputError(f"normalizers for unknown modules: {sorted(unknown)[:5]}")
        self.proj = ProjectionCache(
            cfg.projection_type,
            cfg.projection_scale,
            version=cfg.projection_version,
            seed=cfg.projection_seed,
        )
        self.mask: torch.Tensor | None = None
        self._stash: dict[str, list[torch.Tensor]] = {}
        self.out: dict[str, torch.Tensor] = {}
        self._columns: dict[str, tuple[int, int]] = {}
        self.dim = 0
        """Width of a whole row: ``sum(grad_sizes)``."""
        for key, size in self.grad_sizes.items():  # each block's columns of a whole row
            self._columns[key] = (self.dim, self.dim + size)
            self.dim += size
        self._flat_wanted = False
        self._flat: torch.Tensor | None = None
        """``[rows, sum(grad_sizes)]``, filled block by block (``begin(flat=True)``)."""
        self._dense_of: torch.Tensor | None = None  # the mask _dense describes
        self._dense = False

    # -- layout -----------------------------------------------------------------
    @property
    def grad_sizes(self) -> dict[str, int]:
        if self.global_proj:
            return {"gradients": self.p}
        sizes: dict[str, int] = {}
        for blocks in self.blocks.values():
            for b in blocks:
                sizes[b.name] = self.p * self.p if self.p > 0 else b.full_size
        return sizes

    def begin(self, mask: torch.Tensor, flat: bool = False) -> None:
        """Start a batch; ``mask [N, S]`` marks collected positions.

        ``flat``: write each block straight into its columns of one ``[rows, D]``
        tensor (:meth:`finish_flat`) instead of keeping blocks to concatenate: the
        batch's rows then exist once, not twice (whole gradients of a small model are
        megabytes per row), and no concatenation runs.
        """
        self.mask = mask
        self._stash.clear()
        self.out = {}
        self._flat_wanted = flat and not self.global_proj
        self._flat = None

    def finish(self) -> dict[str, torch.Tensor]:
        """Rows per block (``[N, d]``, or ``[T, d]`` per token) in ``grad_sizes`` order."""
        if self._stash:
            raise RuntimeError(f"no backward reached modules {sorted(self._stash)[:3]}")
        if self.global_proj:
            return {"gradients": self.out.pop("gradients")}
        missing = [k for k in self.grad_sizes if k not in self.out]
        if missing:
            raise RuntimeError(f"no gradient reached {missing[:3]} (is the module used?)")
        return {k: self.out.pop(k) for k in self.grad_sizes}

    def finish_flat(self) -> torch.Tensor:
        """The batch's whole rows, ``[N, D]`` (or ``[T, D]``), blocks in ``grad_sizes`` order."""
        if not self._flat_wanted:
            blocks = list(self.finish().values())
            return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        self.finish()  # checks every block arrived (``out`` holds their names only)
        flat, self._flat = self._flat, None
        assert flat is not None, "begin(flat=True) and a backward pass come first"
        return flat

    def _store(self, key: str, rows: torch.Tensor) -> None:
        """Keep one block's rows: in its columns of the flat tensor, or as a block."""
        if not self._flat_wanted:
            self.out[key] = rows
            return
        if self._flat is None:
            self._flat = torch.empty(rows.shape[0], self.dim, dtype=rows.dtype, device=rows.device)
        lo, hi = self._columns[key]
        self._flat[:, lo:hi].copy_(rows)
        self.out[key] = self._flat  # a marker for finish()'s check: no copy

    # -- taps -------------------------------------------------------------------
    def _uses_adam(self, name: str) -> bool:
        return isinstance(self.normalizers.get(name), AdamNormalizer)

    def _head_right(self, name: str) -> bool:
        """Whether each split head of ``name`` has its own right matrix, named after the head.

        bergson (projection version 2) projects activations once, in the forward pass,
        with the module's right matrix, unless that matrix must also carry the bias
        column or act on an Adam-normalized gradient: then it is applied per head under
        the head's name. Version 1 always uses the module's.
        """
        blocks = self.blocks[name]
        return self.proj.version >= 2 and len(blocks) > 1 and (blocks[0].bias or self._uses_adam(name))

    def _right(self, name: str, block: Block, device) -> torch.Tensor:
        owner = block.name if self._head_right(name) else name
        return self.proj.get(
            owner, "right", self.p, block.in_features + int(block.bias), torch.float32, device
        )

    def on_forward(self, name: str, module: nn.Module, a: torch.Tensor) -> None:
        a = a.float()
        norm = self.normalizers.get(name)
        if isinstance(norm, AdafactorNormalizer):
            a = a * norm.col_scale().to(a.device)
        if (
            self.p > 0
            and not self.global_proj
            and not self._uses_adam(name)
            and not self._head_right(name)
        ):
            blk = self.blocks[name][0]
            a = a @ self._right(name, blk, a.device)[:, : blk.in_features].T  # [N,S,p]
        self._stash.setdefault(name, []).append(a)

    def on_backward(self, name: str, module: nn.Module, g: torch.Tensor) -> None:
        a = self._stash[name].pop()
        if not self._stash[name]:
            del self._stash[name]
        assert self.mask is not None, "begin() not called"
        mask = self.mask
        g_raw = g.float() if self._all_positions(mask) else g.float() * mask[..., None].to(g.device)
        per_token = self.cfg.attribute_tokens
        if per_token:
            sel = mask.to(g.device)
            g_raw, a = g_raw[sel], a[sel]  # [T, O], [T, I or p]
        norm = self.normalizers.get(name)
        for blk in self.blocks[name]:
            bnorm = norm.head(blk.lo, blk.hi) if norm is not None and len(self.blocks[name]) > 1 else norm
            rows = self._block_rows(name, blk, a, g_raw[..., blk.lo : blk.hi], bnorm, per_token)
            if self.global_proj:
                self.out["gradients"] = self.out.get("gradients", 0) + rows
            else:
                self._store(blk.name, rows)

    # -- math -------------------------------------------------------------------
    def _all_positions(self, mask: torch.Tensor) -> bool:
        """Whether ``mask`` selects every position, so multiplying by it can be skipped.

        Checked once per mask, and only on the CPU: on an accelerator the check would be a
        host sync per batch, dearer than the multiply it saves.
        """
        if mask is not self._dense_of:
            self._dense_of = mask
            self._dense = mask.device.type == "cpu" and bool(mask.all())
        return self._dense

    def _block_rows(
        self,
        name: str,
        blk: Block,
        a: torch.Tensor,
        g_raw: torch.Tensor,
        norm: Normalizer | None,
        per_token: bool,
    ) -> torch.Tensor:
        """Rows for one block. Shapes: sequence mode ``a [N,S,*]``, ``g [N,S,O]``;
        per-token mode ``a [T,*]``, ``g [T,O]`` (one "sequence" of length 1 per token)."""
        if per_token:  # treat each token as its own length-1 sequence
            a, g_raw = a[:, None, :], g_raw[:, None, :]
        g = g_raw
        bias_vec = None
        if blk.bias:
            bias_vec = g_raw.sum(dim=1)  # [N, O]
            scale = norm.bias_scale() if norm is not None else None
            if scale is not None:
                bias_vec = bias_vec * scale.to(g.device)
        if isinstance(norm, AdafactorNormalizer):
            g = g * norm.row_scale().to(g.device)
        n = g.shape[0]

        if self.p > 0 and not self.global_proj and not isinstance(norm, AdamNormalizer):
            left = self.proj.get(blk.name, "left", self.p, blk.out_features, torch.float32, g.device)
            lg = g @ left.T  # [N,S,p]
            if self._head_right(name):  # activations arrive unprojected: use this head's R
                a = a @ self._right(name, blk, g.device)[:, : blk.in_features].T
            out = torch.bmm(lg.transpose(1, 2), a)  # [N,p,q]: Σ_s lg_s ⊗ a_s
            if bias_vec is not None:
                r_bias = self._right(name, blk, g.device)[:, blk.in_features]
                out = out + (bias_vec @ left.T)[:, :, None] * r_bias[None, None, :]
            return out.reshape(n, -1)

        full = torch.bmm(g.transpose(1, 2), a)  # [N, O, I], a fresh tensor: scaled in place
        if isinstance(norm, AdamNormalizer):
            full.mul_(norm.weight_scale().to(g.device))
        if bias_vec is not None:
            full = torch.cat([full, bias_vec[:, :, None]], dim=2)
        if self.p <= 0:
            return full.reshape(n, -1)
        if self.global_proj:
            single = self.proj.get(blk.name, "single", self.p, blk.full_size, torch.float32, g.device)
            return full.reshape(n, -1) @ single.T
        left = self.proj.get(blk.name, "left", self.p, blk.out_features, torch.float32, g.device)
        right = self._right(name, blk, g.device)
        return (left @ full @ right.T).reshape(n, -1)
