"""Scores of training rows against a bank of query gradients (pure torch).

``prepare_query`` turns the rows of a query store into the matrix every worker
multiplies with: restricted to the scored modules, preconditioned and normalized
unless the query store says that was already done when it was built, then
aggregated. ``score_rows`` is one GEMM per batch (sliced over queries when asked,
to bound memory) plus the max for ``nearest``.
"""

from __future__ import annotations

import torch

from ..config import PreprocessConfig
from ..errors import BadInputError
from ..utils.columns import column_offsets
from .preprocess import hessian_power, unit_normalize


def select_columns(
    rows: torch.Tensor, have: dict[str, int], want: dict[str, int], what: str = "query store"
) -> torch.Tensor:
    """Columns of ``rows`` (laid out per ``have``) for the modules of ``want``, in its order."""
    offsets = column_offsets(have)
    parts = []
    for name, size in want.items():
        if name not in offsets:
            sample = ", ".join(list(have)[:4])
            raise BadInputError(
                f"{what} has no module {name!r} (it holds {len(have)} modules, e.g. {sample}); "
                "build it with the same model and --modules/--filter_modules"
            )
        lo, hi = offsets[name]
        have_size = hi - lo
        if have_size != size:
            raise BadInputError(
                f"{what} stores {have_size} values for {name} but this run makes {size}: "
                "projection_dim / include_bias / attention split must match"
            )
        parts.append(rows[:, lo : lo + size])
    return torch.cat(parts, dim=1)


def prepare_query(
    rows: torch.Tensor,
    query_sizes: dict[str, int],
    target_sizes: dict[str, int],
    pre: PreprocessConfig,
    *,
    done_at_build: PreprocessConfig | None = None,
    mode: str = "individual",
    preconditioner=None,
) -> torch.Tensor:
    """The ``[Q, D]`` query matrix for ``score_rows``.

    ``done_at_build`` is the query store's own preprocess settings: a Hessian or a
    normalization it already applied is not applied again (bergson's rule).
    """
    q = select_columns(rows.float(), query_sizes, target_sizes)
    done = done_at_build or PreprocessConfig()
    if preconditioner is not None and not done.hessian_path:
        q = preconditioner.apply_inverse(q, hessian_power(pre), target_sizes)
    if pre.unit_normalize and not done.unit_normalize:
        q = unit_normalize(q)
    aggregation = pre.aggregation
    if mode == "mean" and aggregation == "none":
        aggregation = "mean"
    if aggregation in ("mean", "sum") and done.aggregation == "none" and len(q) > 1:
        q = q.mean(0, keepdim=True) if aggregation == "mean" else q.sum(0, keepdim=True)
    if pre.normalize_aggregated_grad:
        q = unit_normalize(q)
    return q.contiguous()


def score_rows(
    rows: torch.Tensor, query: torch.Tensor, mode: str = "individual", query_batch_size: int | None = None
) -> torch.Tensor:
    """``[B, Q]`` inner products (``[B, 1]`` max for nearest/max; mean queries arrive aggregated)."""
    rows = rows.float()
    step = query_batch_size or len(query)
    if mode in ("nearest", "max"):
        best = torch.full((len(rows), 1), -torch.inf)
        for lo in range(0, len(query), step):
            best = torch.maximum(best, (rows @ query[lo : lo + step].T).amax(dim=1, keepdim=True))
        return best
    return torch.cat([rows @ query[lo : lo + step].T for lo in range(0, len(query), step)], dim=1)


def num_score_columns(num_queries: int, mode: str) -> int:
    return 1 if mode in ("nearest", "max", "mean") else num_queries


__all__ = ["prepare_query", "score_rows", "select_columns", "unit_normalize", "num_score_columns"]
