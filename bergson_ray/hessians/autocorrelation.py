"""Dense "autocorrelation" Hessian: the Gram of the stored (processed) gradient rows.

``H_m = Σ_rows P_mᵀ P_m / num_rows`` per module block, where ``P`` are exactly the
rows a ``build`` would write (normalizer, projection). ``num_rows`` counts every
row, including the zero rows of documents too short to carry a gradient
(bergson divides by ``len(dataset)`` the same way), so it is added explicitly
rather than inferred from the rows seen.
"""

from __future__ import annotations

import torch

from .accumulator import COUNT, SummedState, compute_dtype


class GramAccumulator(SummedState):
    """``Σ PᵀP`` of one module's ``[rows, d]`` blocks, plus the row count."""

    method = "autocorrelation"

    def __init__(
        self, dim: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ):
        self.dim = dim
        self.dtype = dtype
        self.compute_dtype = compute_dtype(dtype)
        super().__init__(
            {
                "H": torch.zeros(dim, dim, dtype=dtype, device=device),
                COUNT: torch.zeros((), dtype=torch.int64, device=device),
            }
        )

    def update_rows(self, rows: torch.Tensor, num_rows: int | None = None) -> None:
        """Add ``rows [R, d]``; ``num_rows`` (default ``R``) is what the rows count for."""
        if rows.shape[-1] != self.dim:
            raise ValueError(f"expected rows of width {self.dim}, got {rows.shape[-1]}")
        p = rows.reshape(-1, self.dim).to(self.compute_dtype)
        self._state["H"].add_((p.T @ p).to(self.dtype))
        self._state[COUNT].add_(p.shape[0] if num_rows is None else num_rows)

    def add_rows_count(self, n: int) -> None:
        """Count rows that contribute nothing (documents with < 2 tokens)."""
        self._state[COUNT].add_(n)

    def finalize(self) -> torch.Tensor:
        """The second-moment matrix ``Σ PᵀP / num_rows`` (zero if no rows)."""
        n = max(self.count, 1)
        return self._state["H"] / n
