"""Running sums that workers pre-sum locally and shard actors merge.

Every quantity a Hessian accumulator keeps is a *sum* over positions, sequences
or batches (factor matrices, trace weights, counts). That makes the state a flat
``dict[str, Tensor]`` that adds elementwise: a worker sums many batches into its
own copy, ships ``state_dict()`` once, and the owning shard ``merge``s it. The
result is independent of how positions were split across batches, workers and
shards (up to floating-point summation order), except where a method is batch
dependent by construction (Shampoo).

Non-additive post-processing (TKFAC's trace normalisation, Shampoo's division
by the trace, the Gram's division by the row count) happens once, in
``finalize``, after every contribution has been merged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch

COUNT = "count"
"""State key of the number of positions (or rows, or documents) summed so far."""

ROUTED = "routed"
"""State key of a factor accumulator's divisor: the collected positions that reached the
module. Equal to ``COUNT`` except for a fused MoE expert, which only sees the positions
routed to it (bergson divides an expert's factor sums by those, too)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for a batch's matmuls: fp64 stays fp64, everything else runs in fp32.

    Half-precision GEMMs would lose most of a sum of many outer products; the
    storage dtype (``hessian_dtype``) only applies to what is kept.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


class SummedState:
    """A named set of tensors that only ever grows by addition."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running sums (the live tensors; copy before mutating)."""
        return self._state

    def merge(self, other: Mapping[str, torch.Tensor]) -> None:
        """Add another accumulator's ``state_dict()`` of the same kind and shape."""
        if set(other) != set(self._state):
            raise ValueError(
                f"cannot merge state with keys {sorted(other)} into {sorted(self._state)}"
            )
        for key, value in other.items():
            mine = self._state[key]
            if value.shape != mine.shape:
                raise ValueError(
                    f"shape mismatch for {key!r}: {tuple(value.shape)} vs {tuple(mine.shape)}"
                )
            mine.add_(value.to(device=mine.device, dtype=mine.dtype))

    def reset(self) -> None:
        for value in self._state.values():
            value.zero_()

    @property
    def count(self) -> int:
        return int(self._state[COUNT])

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self._state.values())


def select_positions(
    x: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``x [N, S, D]`` at the collected positions -> ``[P, D]`` in ``dtype``.

    ``mask=None`` means every position counts (``x`` may then already be ``[P, D]``).
    """
    if mask is not None:
        x = x[mask]
    return x.reshape(-1, x.shape[-1]).to(dtype)


def with_ones(a: torch.Tensor) -> torch.Tensor:
    """Append the constant input of the bias: gradients are ``[O, I+1]``, bias last."""
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


@dataclass
class Factors:
    """A module's final Kronecker factors, ready for the eigendecomposition.

    ``A`` and ``S`` are *sums* over ``count`` positions (those that reached the module:
    for an MoE expert, the ones routed to it); the eigendecomposition divides by
    ``count`` (bergson's convention).
    """

    A: torch.Tensor  # [I', I'] activation factor (I' = I + 1 with bias)
    S: torch.Tensor  # [O, O] output-gradient factor
    count: int


class FactorAccumulator(SummedState, ABC):
    """Kronecker-factor statistics of one ``Linear``-like module.

    ``update`` gets the module input ``a [N, S, I]``, the gradient of its output
    ``g [N, S, O]``, the collection mask ``[N, S]`` of one batch and, for an MoE
    expert, the ``[N, S]`` positions routed to it. Subclasses implement
    ``_accumulate`` on the positions that reached the module; the counts are kept here.
    """

    method: str = ""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        extra: dict[str, torch.Tensor] | None = None,
    ):
        self.in_features = in_features + int(bias)
        self.out_features = out_features
        self.bias = bias
        self.dtype = dtype
        self.compute_dtype = compute_dtype(dtype)
        i, o = self.in_features, out_features
        state = {
            "A": torch.zeros(i, i, dtype=dtype, device=device),
            "S": torch.zeros(o, o, dtype=dtype, device=device),
            COUNT: torch.zeros((), dtype=torch.int64, device=device),
            ROUTED: torch.zeros((), dtype=torch.int64, device=device),
        }
        state.update(extra or {})
        super().__init__(state)

    def _positions(
        self, a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a = select_positions(a, mask, self.compute_dtype)
        g = select_positions(g, mask, self.compute_dtype)
        if self.bias:
            a = with_ones(a)
        if a.shape[1] != self.in_features or g.shape[1] != self.out_features:
            raise ValueError(
                f"expected activations with {self.in_features} and gradients with "
                f"{self.out_features} features, got {a.shape[1]} and {g.shape[1]}"
            )
        return a, g

    def _add(self, key: str, value: torch.Tensor) -> None:
        self._state[key].add_(value.to(self._state[key].dtype))

    @property
    def routed_count(self) -> int:
        """Positions that reached the module: the divisor of its factor sums."""
        return int(self._state[ROUTED])

    def update(
        self,
        a: torch.Tensor,
        g: torch.Tensor,
        mask: torch.Tensor | None,
        routed: torch.Tensor | None = None,
    ) -> None:
        """Add one batch's contribution.

        ``COUNT`` grows by every collected position (the driver checks it against the
        workers' totals), ``ROUTED`` only by those in ``routed`` too. An expert's ``a``
        and ``g`` are zero elsewhere, so restricting to them leaves the sums unchanged.
        """
        total = a.reshape(-1, a.shape[-1]).shape[0] if mask is None else int(mask.sum())
        self._state[COUNT].add_(total)
        if routed is not None:
            mask = routed if mask is None else mask & routed
            total = int(mask.sum())
        self._state[ROUTED].add_(total)
        self._accumulate(a, g, mask)

    @abstractmethod
    def _accumulate(self, a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add the sums of the positions in ``mask`` (all of them when ``None``)."""

    def finalize(self) -> Factors:
        """The factors to eigendecompose (after every merge). Default: the raw sums."""
        return Factors(self._state["A"].clone(), self._state["S"].clone(), self.routed_count)
