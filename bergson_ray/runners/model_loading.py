"""Load a causal LM and its tokenizer from a hub id, a local dir, or ``tiny``.

Kept free of Ray so the workers, the query actor and the in-process Attributor
load models the same way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..config import TINY, ModelConfig
from ..errors import BadInputError, load_error
from ..utils.dtypes import torch_dtype
from ..utils.kv import parse_kv
from ..utils.quiet import quiet_model_loading

log = logging.getLogger(__name__)


def resolve_model_name(name: str) -> str:
    """``tiny`` -> the embedded default's dir; a local path must exist; hub ids pass through."""
    if name == TINY:
        from ..defaults.tiny import ensure_tiny_assets

        return str(ensure_tiny_assets().model_dir)
    if _looks_local(name) and not Path(os.path.expanduser(name)).exists():
        raise BadInputError(f"model path {name} does not exist")
    return os.path.expanduser(name)


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(name))


def model_dtype(precision: str) -> torch.dtype | str:
    """``--precision``: ``auto`` (the checkpoint's dtype) or a dtype name."""
    return "auto" if precision == "auto" else torch_dtype(precision, "precision")


def apply_kernel_settings(cfg: ModelConfig) -> None:
    """``--force_math_sdp`` / ``--use_tf32_matmuls``: process-wide torch settings, applied
    where each worker loads its model (``test_model_configuration`` says when to use them).

    Disabling the flash and memory-efficient SDPA backends makes ``scaled_dot_product_attention``
    use the math kernel on GPU *and* CPU (torch's CPU dispatcher honours the same flags).
    """
    if getattr(cfg, "force_math_sdp", False):
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
            torch.backends.cuda.enable_cudnn_sdp(False)
    if getattr(cfg, "use_tf32_matmuls", False):
        torch.set_float32_matmul_precision("high")


def load_model(cfg: ModelConfig, device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer)`` with the model in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    apply_kernel_settings(cfg)
    quiet_model_loading()
    name = resolve_model_name(cfg.model)
    kwargs = parse_kv(cfg.model_kwargs, "--model_kwargs")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.expanduser(name),
            revision=cfg.revision,
            dtype=model_dtype(cfg.precision),
            **kwargs,
        )
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, SafetensorError, ...
        raise load_error("model", cfg.model, err) from None
    tok_name = resolve_model_name(cfg.tokenizer) if cfg.tokenizer else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(tok_name), revision=cfg.revision)
    except Exception as err:  # noqa: BLE001
        raise load_error("tokenizer", tok_name, err) from None
    model.to(device).eval()
    return model, tokenizer


def max_model_length(model, tokenizer) -> int | None:
    n = getattr(model.config, "max_position_embeddings", None)
    t = getattr(tokenizer, "model_max_length", None)
    cands = [x for x in (n, t) if isinstance(x, int) and 0 < x < 10**8]
    return min(cands) if cands else None
