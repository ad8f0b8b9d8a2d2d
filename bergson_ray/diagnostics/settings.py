"""The escalating numerical settings ``test_model_configuration`` tries, cheapest first.

Each setting is a set of flags that ``build`` / ``score`` / ``hessian`` accept (they are
fields of :class:`~bergson_ray.config.ModelConfig`), so the first setting whose trials
all pass is printed as the flags to add:

* ``--precision fp32`` (bf16/fp16 rounding grows with a padded batch's shape),
* ``--use_tf32_matmuls`` (GPU only: fp32 weights with TF32 matmuls, nearly bf16's speed),
* ``--force_math_sdp`` (the math SDPA kernel instead of the flash / memory-efficient
  ones; on CPU too, whose flash kernel is chosen by the same switch),
* ``--model_kwargs attn_implementation=eager`` (the model's plain PyTorch attention, for
  models whose SDPA path mishandles padding).

TF32 only *lowers* fp32 accuracy, so it appears only as a cheaper stand-in for plain
fp32, and only where it exists (CUDA).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..config.sections import ModelConfig
from ..utils.kv import parse_kv

EAGER = "eager"


@dataclass(frozen=True)
class Setting:
    """One rung of the ladder: precision and kernel choices."""

    precision: str
    force_math_sdp: bool = False
    use_tf32_matmuls: bool = False
    attn_implementation: str = ""
    """Attention implementation to force ("" = what ``--model_kwargs`` or the model chose)."""

    def flags(self, base_precision: str) -> list[str]:
        """The command-line flags that select this setting on build / score / hessian."""
        out = []
        if self.precision != base_precision:
            out.append(f"--precision {self.precision}")
        if self.use_tf32_matmuls:
            out.append("--use_tf32_matmuls")
        if self.force_math_sdp:
            out.append("--force_math_sdp")
        if self.attn_implementation:
            out.append(f"--model_kwargs attn_implementation={self.attn_implementation}")
        return out

    def label(self, base_precision: str) -> str:
        flags = self.flags(base_precision)
        return " ".join(flags) if flags else f"defaults (precision={base_precision})"

    def model_config(self, base: ModelConfig) -> ModelConfig:
        """``base`` with this setting's precision, kernels and attention implementation."""
        kwargs = base.model_kwargs
        if self.attn_implementation:
            parse_kv(base.model_kwargs, "--model_kwargs")  # reject a malformed string here
            kept = [
                part for part in (p.strip() for p in base.model_kwargs.split(","))
                if part and part.split("=", 1)[0].strip() != "attn_implementation"
            ]
            kwargs = ",".join([*kept, f"attn_implementation={self.attn_implementation}"])
        return dataclasses.replace(
            base,
            precision=self.precision,  # type: ignore[arg-type]
            force_math_sdp=self.force_math_sdp or base.force_math_sdp,
            use_tf32_matmuls=self.use_tf32_matmuls,
            model_kwargs=kwargs,
        )


def escalation(base_precision: str, on_gpu: bool) -> list[Setting]:
    """Settings in the order they are tried: cheap fixes first, full fp32 last."""
    base = base_precision
    ladder = [Setting(base)]
    if base != "fp32":
        if on_gpu:
            ladder.append(Setting("fp32", use_tf32_matmuls=True))
        ladder += [Setting(base, force_math_sdp=True), Setting(base, attn_implementation=EAGER)]
        if on_gpu:
            ladder.append(Setting("fp32", force_math_sdp=True, use_tf32_matmuls=True))
        ladder.append(Setting("fp32"))
    ladder += [Setting("fp32", force_math_sdp=True), Setting("fp32", attn_implementation=EAGER)]
    return ladder


@contextlib.contextmanager
def kernel_state() -> Iterator[None]:
    """Restore torch's SDPA backend switches and float32 matmul precision on exit
    (loading a model with ``--force_math_sdp`` or ``--use_tf32_matmuls`` changes them
    process-wide)."""
    cuda = torch.backends.cuda
    saved = {
        "flash": cuda.flash_sdp_enabled(),
        "mem": cuda.mem_efficient_sdp_enabled(),
        "math": cuda.math_sdp_enabled(),
        "cudnn": cuda.cudnn_sdp_enabled() if hasattr(cuda, "cudnn_sdp_enabled") else None,
        "matmul": torch.get_float32_matmul_precision(),
    }
    try:
        yield
    finally:
        cuda.enable_flash_sdp(saved["flash"])
        cuda.enable_mem_efficient_sdp(saved["mem"])
        cuda.enable_math_sdp(saved["math"])
        if saved["cudnn"] is not None:
            cuda.enable_cudnn_sdp(saved["cudnn"])
        torch.set_float32_matmul_precision(saved["matmul"])
