"""Load the model to train (fp32 or fp64, on CPU) and its tokenizer.

Kept inside ``training`` (rather than reusing the runners' loader) so this package stays
free of Ray and of the pipeline layer: a validate worker, a test and the CLI all load
the same way.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..config.sections import ModelConfig
from ..defaults.tiny import resolve_model_path
from ..errors import BadInputError, load_error
from ..utils.kv import parse_kv
from ..utils.quiet import quiet_model_loading

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def resolve(name: str) -> str:
    """``tiny`` -> the embedded model dir; ``~`` expanded; a missing local path rejected."""
    path = os.path.expanduser(resolve_model_path(name))
    if path.startswith(("/", "./", "../")) and not os.path.exists(path):
        raise BadInputError(f"model path {name} does not exist")
    return path


def make_model(cfg: ModelConfig, dtype: torch.dtype | None = None) -> tuple[nn.Module, object]:
    """``(model, tokenizer)``: the causal LM on CPU in ``dtype`` (default: --precision).

    The model is returned in eval mode with every parameter trainable; the trainer
    never mutates it (it trains a copy of its parameters). Attention is "eager", as
    bergson's trainer loads it: same numerics, and twice differentiable (metagradients).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = resolve(cfg.model)
    if dtype is None and cfg.precision not in ("auto", *DTYPES):
        raise BadInputError("train runs on CPU in fp32 or fp64; pass --precision fp32 or fp64")
    want = dtype or DTYPES.get(cfg.precision, "auto")
    kwargs = parse_kv(cfg.model_kwargs, "--model_kwargs")
    quiet_model_loading()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=cfg.revision, dtype=want, **{"attn_implementation": "eager", **kwargs}
        )
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, SafetensorError, ...
        raise load_error("model", cfg.model, err) from None
    if model.dtype not in (torch.float32, torch.float64):
        model = model.float()
    tok_name = resolve(cfg.tokenizer) if cfg.tokenizer else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_name, revision=cfg.revision)
    except Exception as err:  # noqa: BLE001
        raise load_error("tokenizer", tok_name, err) from None
    model.requires_grad_(True)
    return model.eval(), tokenizer


def max_model_length(model: nn.Module, tokenizer) -> int | None:
    """The longest input the model and tokenizer accept (None = unknown)."""
    sizes = (
        getattr(getattr(model, "config", None), "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    )
    known = [s for s in sizes if isinstance(s, int) and 0 < s < 10**8]
    return min(known) if known else None
