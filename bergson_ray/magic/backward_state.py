"""The reverse pass's own state, saved every ``--backward_save_every`` updates so an
interrupted query resumes where it stopped instead of from the last update.

One safetensors file: ``p/<param>`` (cotangent on the parameters), ``s/<kind>/<param>``
(on the optimizer buffers), ``w`` (weight gradients so far) and ``next_step`` in the
metadata. Written to a temporary sibling and renamed, so the file is always whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor


@dataclass
class BackwardState:
    """Cotangents after processing updates ``> next_step`` (the next one to replay)."""

    next_step: int
    lam_params: dict[str, Tensor]
    lam_state: dict[str, dict[str, Tensor]]
    weight_grads: Tensor


def save_backward(path: Path, bw: BackwardState) -> None:
    tensors = {f"p/{k}": v.detach().contiguous() for k, v in bw.lam_params.items()}
    for kind, group in bw.lam_state.items():
        tensors.update({f"s/{kind}/{k}": v.detach().contiguous() for k, v in group.items()})
    tensors["w"] = bw.weight_grads.detach().contiguous()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp), metadata={"next_step": str(bw.next_step)})
    os.replace(tmp, path)


def load_backward(path: Path) -> BackwardState:
    with safe_open(str(path), "pt") as f:
        next_step = int((f.metadata() or {})["next_step"])
    params: dict[str, Tensor] = {}
    state: dict[str, dict[str, Tensor]] = {}
    weights = None
    for key, t in load_file(str(path)).items():
        if key == "w":
            weights = t
        elif key.startswith("p/"):
            params[key[2:]] = t
        else:
            kind, _, name = key[2:].partition("/")
            state.setdefault(kind, {})[name] = t
    assert weights is not None, f"{path} has no weight gradients"
    return BackwardState(next_step, params, state, weights)
