"""Settings of the ``hessian`` command (bergson's ``HessianConfig``) and its run config.

Kept next to the math so the pure-torch package owns its own knobs; the CLI turns
these dataclasses into flags with ``cli.args``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..config import (
    BatchConfig,
    DataConfig,
    GradientConfig,
    ModelConfig,
    RayConfig,
    RunConfig,
)
from ..errors import BadInputError

Method = Literal["autocorrelation", "kfac", "tkfac", "shampoo"]
HessianDtype = Literal["fp32", "fp64", "bf16", "fp16"]
FACTORED_METHODS: tuple[str, ...] = ("kfac", "tkfac", "shampoo")

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def torch_dtype(name: str) -> torch.dtype:
    """``'fp32'`` -> ``torch.float32`` (bergson's precision names and torch's both accepted)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise BadInputError(
            f"unknown hessian dtype {name!r}; use one of fp32, fp64, bf16, fp16"
        ) from None


@dataclass
class HessianConfig:
    """What to fit (bergson's ``HessianConfig``) plus how many accumulator shards."""

    method: Method = "kfac"
    """``autocorrelation`` (dense Gram of the stored rows) or a factored method."""
    ev_correction: bool = False
    """EK-FAC: a second pass fitting the eigenvalues in the Kronecker eigenbasis."""
    hessian_dtype: HessianDtype = "fp32"
    """Accumulation and storage dtype of factors and eigenvalues (eigh is always fp64)."""
    use_dataset_labels: bool = False
    """Empirical Fisher (dataset labels) instead of the true Fisher (model-sampled labels)."""
    num_shards: int = 0
    """HessianShard actors holding the accumulators; 0 = min(#modules, 4)."""
    seed: int = 0
    """Seed of the true-Fisher label sampling (combined with each document's row index)."""
    max_shard_restarts: int = 2
    """Dead shard actors replaced (and their data replayed) before the run fails."""

    def validate(self, grad: GradientConfig) -> None:
        """Reject combinations bergson rejects, with a message naming the fix."""
        torch_dtype(self.hessian_dtype)
        if self.method not in ("autocorrelation", *FACTORED_METHODS):
            raise BadInputError(f"unknown --method {self.method!r}")
        if self.method == "autocorrelation":
            if self.ev_correction:
                raise BadInputError(
                    "--ev_correction needs a factored --method (kfac/tkfac/shampoo)"
                )
            if grad.projection_target == "global":
                raise BadInputError(
                    "autocorrelation with --projection_target global is not supported"
                )
        else:
            if grad.projection_dim != 0 and self.ev_correction:
                raise BadInputError(
                    "EK-FAC (--ev_correction) works on full gradients; set --projection_dim 0"
                )
            if grad.split_attention_modules:
                raise BadInputError(
                    "factored Hessians are fit per whole module; drop --split_attention_modules"
                )
        if self.num_shards < 0:
            raise BadInputError("--num_shards must be >= 0")
        if self.max_shard_restarts < 0:
            raise BadInputError("--max_shard_restarts must be >= 0")

    @property
    def factored(self) -> bool:
        return self.method in FACTORED_METHODS


@dataclass
class HessianRunConfig:
    """Everything ``bergson-ray hessian`` needs."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grad: GradientConfig = field(default_factory=GradientConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    hessian: HessianConfig = field(default_factory=HessianConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    skip_short_docs: bool = False
    """Keep documents with < 2 tokens (they contribute nothing) instead of failing."""
