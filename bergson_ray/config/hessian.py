"""The ``hessian`` section (bergson's ``HessianConfig``): what to fit, in which dtype,
over how many accumulator shards. Its checks against the gradient settings live on the
command configs (``commands.py``), which hold both sections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .sections import GradientConfig, require

Method = Literal["autocorrelation", "kfac", "tkfac", "shampoo"]
HessianDtype = Literal["fp32", "fp64", "bf16", "fp16"]
FACTORED_METHODS: tuple[str, ...] = ("kfac", "tkfac", "shampoo")


@dataclass
class HessianConfig:
    """What to fit (bergson's ``HessianConfig``) plus how many accumulator shards."""

    method: Method = "kfac"
    """autocorrelation (dense Gram of the stored rows) or a factored method."""
    ev_correction: bool = False
    """EK-FAC: a second pass fitting the eigenvalues in the Kronecker eigenbasis."""
    hessian_dtype: HessianDtype = "fp32"
    """Accumulation and storage dtype of factors and eigenvalues (eigh is always fp64)."""
    use_dataset_labels: bool = False
    """Empirical Fisher (dataset labels) instead of the true Fisher (model-sampled labels)."""
    num_shards: int = 0
    """HessianShard actors holding the accumulators (0 = min(#modules, 4))."""
    seed: int = 0
    """Seed of the true-Fisher label sampling (combined with each document's row index)."""
    max_shard_restarts: int = 2
    """Dead shard actors replaced (and their data replayed) before the run fails."""
    module_partitions: int = 1
    """Fit the factored methods in this many module groups, one pass over the data per
    group, so workers and shards hold one group's factors at a time; raise it when the
    factors do not fit. The files are the same as with one partition."""

    def __post_init__(self) -> None:
        require(
            self.method in ("autocorrelation", *FACTORED_METHODS),
            f"unknown --method {self.method!r}; use autocorrelation, kfac, tkfac or shampoo",
        )
        require(
            self.hessian_dtype in ("fp32", "fp64", "bf16", "fp16"),
            f"unknown hessian dtype {self.hessian_dtype!r}; use one of fp32, fp64, bf16, fp16",
        )
        require(self.num_shards >= 0, "--num_shards must be >= 0")
        require(self.max_shard_restarts >= 0, "--max_shard_restarts must be >= 0")
        require(self.module_partitions >= 1, "--module_partitions must be >= 1")

    def check_against(self, grad: GradientConfig) -> None:
        """Reject combinations with the gradient settings that bergson rejects."""
        if self.method == "autocorrelation":
            require(
                not self.ev_correction,
                "--ev_correction needs a factored --method (kfac/tkfac/shampoo)",
            )
            require(
                grad.projection_target != "global",
                "autocorrelation with --projection_target global is not supported",
            )
        else:
            require(
                grad.projection_dim == 0 or not self.ev_correction,
                "EK-FAC (--ev_correction) works on full gradients; set --projection_dim 0",
            )
            require(
                not grad.split_attention_modules,
                "factored Hessians are fit per whole module; drop --split_attention_modules",
            )

    @property
    def factored(self) -> bool:
        return self.method in FACTORED_METHODS
