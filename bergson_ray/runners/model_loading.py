"""Load a causal LM and its tokenizer from a hub id, a local dir, or ``tiny``.

Kept free of Ray so the workers, the query actor and the in-process Attributor
load models the same way. Beyond a plain ``from_pretrained`` this is where bergson's
model options take effect: ``--precision int4|int8`` (bitsandbytes quantization, GPU
only), a PEFT adapter directory as ``--model`` and ``--peft_init_kwargs``
(``adapters.py``; the gradient engine then tracks only the adapter's modules).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..config import TINY, ModelConfig
from ..config.sections import QUANTIZED_PRECISIONS
from ..errors import BadInputError, load_error
from ..utils.dtypes import torch_dtype
from ..utils.kv import parse_kv
from ..utils.quiet import quiet_model_loading
from .adapters import attach_adapter, base_model_name

log = logging.getLogger(__name__)


def resolve_model_name(name: str) -> str:
    """``tiny`` -> the embedded default's dir; a local path must exist; hub ids pass through.

    A PEFT adapter (a dir or hub repo holding ``adapter_config.json``) resolves to its base
    model: the model's config, tokenizer and weights are the base's.
    """
    if name == TINY:
        from ..defaults.tiny import ensure_tiny_assets

        return str(ensure_tiny_assets().model_dir)
    if _looks_local(name) and not Path(os.path.expanduser(name)).exists():
        raise BadInputError(f"model path {name} does not exist")
    base = base_model_name(os.path.expanduser(name))
    if base != os.path.expanduser(name):
        return resolve_model_name(base)
    return base


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(name))


def model_dtype(precision: str) -> torch.dtype | str:
    """``--precision``: ``auto`` (the checkpoint's dtype) or a dtype name (``int4`` /
    ``int8``: the dtype of everything bitsandbytes does not quantize, bf16)."""
    return "auto" if precision == "auto" else torch_dtype(precision, "precision")


def quantization_config(precision: str, device: str | torch.device):
    """bitsandbytes settings for ``--precision int4|int8`` (None otherwise), as bergson
    sets them: 4-bit NF4 with double quantization, bf16 compute and storage dtype.

    Raises one sentence when the worker has no GPU or bitsandbytes is missing.
    """
    if precision not in QUANTIZED_PRECISIONS:
        return None
    if torch.device(device).type != "cuda":
        raise BadInputError(
            f"--precision {precision} loads a bitsandbytes-quantized model, which runs only on "
            f"a CUDA GPU, but this worker runs on {torch.device(device).type}"
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise BadInputError(
            f"--precision {precision} needs bitsandbytes: pip install 'bergson_ray[quantization]'"
        )
    from transformers import BitsAndBytesConfig

    compute = torch_dtype(precision, "precision")
    return BitsAndBytesConfig(
        load_in_4bit=precision == "int4",
        load_in_8bit=precision == "int8",
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
    )


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
    """Return ``(model, tokenizer)`` with the model in eval mode on ``device``.

    With a PEFT adapter (``--model ADAPTER_DIR`` or ``--peft_init_kwargs``) the model is
    the ``peft`` wrapper around the base; with ``--precision int4|int8`` it is loaded
    quantized straight onto ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    apply_kernel_settings(cfg)
    quiet_model_loading()
    name = resolve_model_name(cfg.model)
    kwargs = parse_kv(cfg.model_kwargs, "--model_kwargs")
    quant = quantization_config(cfg.precision, device)
    if quant is not None:  # bitsandbytes places the weights itself; .to() is refused later
        kwargs = {"quantization_config": quant, "device_map": {"": _cuda_index(device)}, **kwargs}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.expanduser(name),
            revision=cfg.revision,
            dtype=model_dtype(cfg.precision),
            **kwargs,
        )
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, SafetensorError, ...
        raise load_error("model", cfg.model, err) from None
    model = with_adapter(model, cfg)
    tok_name = resolve_model_name(cfg.tokenizer) if cfg.tokenizer else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(tok_name), revision=cfg.revision)
    except Exception as err:  # noqa: BLE001
        raise load_error("tokenizer", tok_name, err) from None
    if quant is None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _cuda_index(device: str | torch.device) -> int:
    """The CUDA device index a ``device_map`` needs (``"cuda"`` = the current device)."""
    dev = torch.device(device)
    return dev.index if dev.index is not None else torch.cuda.current_device()


def with_adapter(model, cfg: ModelConfig, *, meta: bool = False):
    """``model`` wrapped in the PEFT adapter ``cfg`` asks for (itself when none).

    ``meta=True`` is for the driver's weightless skeleton (``pipelines/stages.meta_model``):
    the adapter's modules are added without reading its weights, so the planned layout
    is the adapter modules' layout.
    """
    name = resolve_model_name(TINY) if cfg.model == TINY else os.path.expanduser(cfg.model)
    return attach_adapter(model, name, getattr(cfg, "peft_init_kwargs", ""), meta=meta)


def max_model_length(model, tokenizer) -> int | None:
    n = getattr(model.config, "max_position_embeddings", None)
    t = getattr(tokenizer, "model_max_length", None)
    cands = [x for x in (n, t) if isinstance(x, int) and 0 < x < 10**8]
    return min(cands) if cands else None
