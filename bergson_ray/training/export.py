"""Write what a training run produced, in bergson's file layouts.

* ``optimizer.pt``: bergson 2.5.1's ``save_second_moments_as_optimizer_pt`` layout --
  ``{"state": {idx: {"exp_avg_sq", "param_name"[, "step"]}}, "param_groups": [...]}``
  with ``idx`` the position in ``model.named_parameters()``, so bergson's readers and
  ours (``--optimizer_state``) both load it;
* ``optimizer_state.safetensors``: the same second moments as ``<param>.exp_avg_sq``
  (the form our ``--optimizer_state`` prefers; no pickle);
* a checkpoint ``step_<i>.ckpt/``: ``model.safetensors`` (trainable parameters) and
  ``trainer_state.safetensors`` (every optimizer buffer, step in the metadata), enough
  to restart or replay training from that state;
* the trained model as an HF directory (``save_pretrained`` + tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .optimizers import second_moments

OPTIMIZER_PT = "optimizer.pt"
OPTIMIZER_SAFETENSORS = "optimizer_state.safetensors"
PARAMS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.safetensors"
LOG_HISTORY = "log_history.json"


def _contig(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous()


def save_optimizer_pt(
    model: nn.Module,
    opt_state: dict,
    path: str | Path,
    *,
    step: int | None = None,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    eps_root: float | None = None,
) -> int:
    """Write the second moments as bergson's ``optimizer.pt``; returns how many."""
    moments = second_moments(opt_state)
    state: dict[int, dict] = {}
    for idx, (name, _) in enumerate(model.named_parameters()):
        if name in moments:
            entry: dict = {"exp_avg_sq": _contig(moments[name]), "param_name": name}
            if step is not None:
                entry["step"] = torch.tensor(step)
            state[idx] = entry
    group: dict = {"params": list(state)}
    if betas is not None:
        group["betas"] = tuple(betas)
    if eps is not None:
        group["eps"] = eps
    if eps_root is not None:
        group["eps_root"] = eps_root
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": state, "param_groups": [group]}, path)
    return len(state)


def save_second_moments(opt_state: dict, path: str | Path) -> int:
    """Write ``<param>.exp_avg_sq`` tensors to a safetensors file; returns how many."""
    moments = {f"{k}.exp_avg_sq": _contig(v) for k, v in second_moments(opt_state).items()}
    save_file(moments, str(path), metadata={"step": str(opt_state.get("step", 0))})
    return len(moments)


def save_checkpoint(directory: str | Path, params: dict[str, Tensor], opt_state: dict) -> Path:
    """Write one training state (parameters + every optimizer buffer) to ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: _contig(v) for k, v in params.items()}, str(d / PARAMS_FILE))
    buffers = {
        f"{kind}/{name}": _contig(t)
        for kind, group in opt_state.items()
        if isinstance(group, dict)
        for name, t in group.items()
    }
    save_file(buffers, str(d / STATE_FILE), metadata={"step": str(opt_state.get("step", 0))})
    return d


def load_checkpoint(directory: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Inverse of :func:`save_checkpoint`: ``(params, opt_state)``."""
    from safetensors import safe_open

    d = Path(directory)
    params = load_file(str(d / PARAMS_FILE))
    with safe_open(str(d / STATE_FILE), "pt") as f:
        step = int((f.metadata() or {}).get("step", 0))
    state: dict = {"step": step}
    for key, t in load_file(str(d / STATE_FILE)).items():
        kind, _, name = key.partition("/")
        state.setdefault(kind, {})[name] = t
    return params, state


def write_params_into(model: nn.Module, params: dict[str, Tensor]) -> nn.Module:
    """Copy ``params`` into ``model``'s own parameters (in place) and return it."""
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            own[name].copy_(value)
    return model


def save_model_dir(model: nn.Module, params: dict[str, Tensor], tokenizer, path: str | Path) -> Path:
    """Save ``model`` carrying ``params`` (and the tokenizer) as an HF model directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_params_into(model, params).save_pretrained(str(path), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def write_log_history(history: list[dict], path: str | Path) -> Path:
    """bergson's ``log_history.json``: one ``{"step", "learning_rate", ...}`` per update."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(history))
    return path
