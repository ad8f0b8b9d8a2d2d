"""Optimizer second-moment normalizers (Adam and Adafactor), as in bergson §3.4.

A normalizer rescales a per-example gradient by the optimizer's running second
moments, so that attribution reflects the update the optimizer would apply.
Adafactor's factored moments can be folded into the activation and output
gradient (cheap; commutes with projection); Adam's elementwise moments need the
full ``[O, I]`` gradient per example before projecting.

Normalizers are *loaded* from an optimizer state, never fitted from data.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import BadInputError
from .modules import Conv1D, weight_shape

log = logging.getLogger(__name__)

ADAM_EPS = 1e-8
ADAFACTOR_EPS = 1e-30


@dataclass
class AdamNormalizer:
    weight_avg_sq: torch.Tensor  # [O, I]
    bias_avg_sq: torch.Tensor | None = None  # [O]

    kind = "AdamNormalizer"

    def weight_scale(self) -> torch.Tensor:
        return 1.0 / (self.weight_avg_sq.sqrt() + ADAM_EPS)

    def bias_scale(self) -> torch.Tensor | None:
        return None if self.bias_avg_sq is None else 1.0 / (self.bias_avg_sq.sqrt() + ADAM_EPS)

    def head(self, lo: int, hi: int) -> AdamNormalizer:
        """The slice for output rows ``[lo, hi)`` (one attention head)."""
        b = None if self.bias_avg_sq is None else self.bias_avg_sq[lo:hi]
        return AdamNormalizer(self.weight_avg_sq[lo:hi], b)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight_avg_sq": self.weight_avg_sq}
        if self.bias_avg_sq is not None:
            out["bias_avg_sq"] = self.bias_avg_sq
        return out


@dataclass
class AdafactorNormalizer:
    """Rank-1 second moments ``V = r cᵀ / mean(r)`` folded into ``g`` and ``a``."""

    row: torch.Tensor  # [O]
    col: torch.Tensor  # [I]
    bias_avg_sq: torch.Tensor | None = None
    row_mean: torch.Tensor | None = None
    """mean(r + eps) of the whole matrix; set on head slices so heads scale like their parent."""

    kind = "AdafactorNormalizer"

    def row_scale(self) -> torch.Tensor:
        r = self.row + ADAFACTOR_EPS
        mean = r.mean() if self.row_mean is None else self.row_mean
        return mean.sqrt() * r.rsqrt()

    def col_scale(self) -> torch.Tensor:
        return (self.col + ADAFACTOR_EPS).rsqrt()

    def bias_scale(self) -> torch.Tensor | None:
        return None if self.bias_avg_sq is None else (self.bias_avg_sq + ADAM_EPS).rsqrt()

    def head(self, lo: int, hi: int) -> AdafactorNormalizer:
        # A head keeps the parent's mean(r) so its rows are scaled as in the whole matrix.
        b = None if self.bias_avg_sq is None else self.bias_avg_sq[lo:hi]
        mean = (self.row + ADAFACTOR_EPS).mean() if self.row_mean is None else self.row_mean
        return AdafactorNormalizer(self.row[lo:hi], self.col, b, row_mean=mean)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"row": self.row, "col": self.col}
        if self.bias_avg_sq is not None:
            out["bias_avg_sq"] = self.bias_avg_sq
        return out


Normalizer = AdamNormalizer | AdafactorNormalizer


def _opt(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.float()


def _find_state_file(path: str) -> Path:
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        for name in ("optimizer_state.safetensors", "optimizer.safetensors", "optimizer.pt"):
            if (p / name).exists():
                return p / name
        raise BadInputError(f"--optimizer_state dir {p} holds no optimizer.pt or *.safetensors")
    if not p.exists():
        raise BadInputError(f"--optimizer_state file {p} does not exist")
    return p


def load_optimizer_normalizers(
    path: str, model: nn.Module, modules: dict[str, nn.Module], include_bias: bool
) -> dict[str, Normalizer]:
    """Normalizers for ``modules`` from an optimizer state file.

    Accepts a safetensors file with ``<param name>.exp_avg_sq`` (Adam) or
    ``.exp_avg_sq_row`` / ``.exp_avg_sq_col`` (Adafactor) keys, or a torch
    ``optimizer.pt`` (loaded with ``weights_only=True``) whose state entries are
    matched to parameters by recorded ``param_name`` or by position.
    """
    file = _find_state_file(path)
    by_param = _moments_by_param_name(file, model)
    out: dict[str, Normalizer] = {}
    for name, mod in modules.items():
        o, i = weight_shape(mod)
        w = _lookup(by_param, name, "weight")
        if w is None:
            raise BadInputError(f"optimizer state {file} has no second moments for {name}.weight")
        b = _lookup(by_param, name, "bias") if include_bias else None
        bias_sq = b.get("exp_avg_sq") if b else None
        conv = bool(Conv1D) and isinstance(mod, Conv1D)
        if "exp_avg_sq" in w:
            v = w["exp_avg_sq"].float()
            v = v.t() if conv else v
            if tuple(v.shape) != (o, i):
                raise BadInputError(f"moment shape {tuple(v.shape)} != weight {(o, i)} for {name}")
            out[name] = AdamNormalizer(v.contiguous(), _opt(bias_sq))
        elif "exp_avg_sq_row" in w:
            row, col = w["exp_avg_sq_row"].float(), w["exp_avg_sq_col"].float()
            if conv:
                row, col = col, row
            out[name] = AdafactorNormalizer(row, col, _opt(bias_sq))
        else:
            raise BadInputError(f"unrecognised moment keys {sorted(w)} for {name}")
    log.info("loaded %d normalizers from %s", len(out), file)
    return out


def _lookup(by_param: dict[str, dict], module: str, leaf: str) -> dict | None:
    suffix = f"{module}.{leaf}"
    for pname, moments in by_param.items():
        if pname == suffix or pname.endswith("." + suffix):
            return moments
    return None


def _moments_by_param_name(file: Path, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        for key, val in load_file(str(file)).items():
            pname, _, field = key.rpartition(".")
            out.setdefault(pname, {})[field] = val
        return out
    from ..store.files import load_tensors_only

    state = load_tensors_only(file)
    if not isinstance(state, dict) or "state" not in state:
        raise BadInputError(f"{file} is not an optimizer state_dict (no 'state' key)")
    names = [n for n, _ in model.named_parameters()]
    order: list[int] = [i for g in state.get("param_groups", []) for i in g.get("params", [])]
    position = {idx: pos for pos, idx in enumerate(sorted(order) if order else [])}
    for idx, entry in state["state"].items():
        pname = entry.get("param_name")
        if pname is None:
            pos = position.get(idx, idx)
            if not isinstance(pos, int) or pos >= len(names):
                continue
            pname = names[pos]
        out[str(pname)] = {k: v for k, v in entry.items() if isinstance(v, torch.Tensor)}
    return out
