"""The linear datamodeling score: does a subset's summed score predict its loss change?

For subset ``S`` and query ``q``: ``diff = baseline_q - loss_q(trained without S)`` and
``score_sum = sum_{d in S} score[d, q]`` with loss-signed scores. Removing proponents
(negative scores) raises the loss (negative diff), so good scores correlate positively;
the LDS of a query is the Spearman correlation over subsets (Pearson reported too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stats import Correlation, pearson, spearman


@dataclass
class LdsResult:
    """``diffs``/``score_sums`` are ``[subsets, queries]``; one correlation per query."""

    subset_ids: list[int]
    diffs: np.ndarray
    score_sums: np.ndarray
    baseline: np.ndarray
    spearman: list[Correlation]
    pearson: list[Correlation]

    @property
    def mean_lds(self) -> float:
        """Mean Spearman over queries (NaN-aware: a constant query does not poison it)."""
        vals = np.array([c.statistic for c in self.spearman], dtype=np.float64)
        return float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")


def score_sums(scores: np.ndarray, subsets: list[np.ndarray]) -> np.ndarray:
    """``[subsets, queries]``: each subset's summed (loss-signed) scores per column."""
    return np.stack([scores[np.asarray(s, dtype=np.int64)].sum(axis=0) for s in subsets])


def compute_lds(
    baseline: np.ndarray,
    subset_losses: np.ndarray,
    scores: np.ndarray,
    subsets: list[np.ndarray],
    subset_ids: list[int],
) -> LdsResult:
    """Correlate ``baseline - subset_losses`` with the subsets' score sums, per query.

    ``baseline`` is ``[Q]`` and ``subset_losses`` ``[S, Q]`` with ``Q`` = score columns
    (1 when one aggregated query is validated on its mean loss).
    """
    baseline = np.asarray(baseline, dtype=np.float64).reshape(-1)
    losses = np.asarray(subset_losses, dtype=np.float64).reshape(len(subsets), -1)
    diffs = baseline[None, :] - losses
    sums = score_sums(np.asarray(scores, dtype=np.float64), subsets)
    sp = [spearman(diffs[:, q], sums[:, q]) for q in range(diffs.shape[1])]
    pe = [pearson(diffs[:, q], sums[:, q]) for q in range(diffs.shape[1])]
    return LdsResult(list(subset_ids), diffs, sums, baseline, sp, pe)


def weight_step_prediction(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bergson's weight step: the step direction (mean score over queries, per document)
    and each query's first-order predicted change per unit lr, ``<s_q, s_step>``."""
    step = scores.mean(axis=1)
    return step, (scores * step[:, None]).sum(axis=0)
