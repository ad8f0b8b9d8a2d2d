"""Empirical metasmoothness (arXiv 2503.13751, Def. 2), as bergson 2.5.1 computes it.

Three trainings with document weights ``1``, ``1 + h v`` and ``1 + 2h v`` (``v`` a
standard normal direction over the documents); the score is the movement-weighted
sign agreement of the two consecutive finite differences of the final parameters.
Near 1: the parameters respond linearly to data weights (metagradients will predict
well); near 0 or negative: they will not. A cheap search objective for eps_root,
adam_eps, lr or batch size before a full leave-k-out validation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config.training import TrainingConfig
from .data import TokenizedData
from .loop import train


def score(theta0: Tensor, theta_h: Tensor, theta_2h: Tensor) -> float:
    """``sum_i d_i/|d|_1 sign(theta_h - theta0)_i sign(theta_2h - theta_h)_i`` with
    ``d = |theta_2h - theta0|`` (1.0 when nothing moved)."""
    d = (theta_2h - theta0).abs()
    total = d.sum()
    if total == 0:
        return 1.0
    agree = torch.sign(theta_h - theta0) * torch.sign(theta_2h - theta_h)
    return float((d / total * agree).sum())


def direction(num_docs: int, batch_size: int, num_epochs: int, seed: int) -> Tensor:
    """bergson's ``v``: ``randn`` seeded with ``seed`` over the documents, plus one
    (zeroed, dropped here) entry for the pad rows when the stream needs padding --
    drawn the same way so the same seed gives the same direction."""
    padded = (num_docs * num_epochs) % batch_size != 0
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_docs + int(padded), generator=gen)[:num_docs]


def flat_params(params: dict[str, Tensor]) -> Tensor:
    """All parameters as one fp32 vector (name order; the score does not depend on it)."""
    return torch.cat([p.detach().float().flatten() for p in params.values()])


def measure(
    model: nn.Module,
    data: TokenizedData,
    cfg: TrainingConfig,
    fd_step: float = 0.1,
    direction_seed: int = 0,
    *,
    on_trained=None,
) -> dict:
    """Train three times and return ``{"score", "fd_step", "direction_seed",
    "total_movement_l1"}`` (bergson's ``metasmoothness.json``).

    ``on_trained(k, result)`` is called after each training (k = 0, 1, 2).
    """
    v = direction(len(data), cfg.batch_size, cfg.num_epochs, direction_seed)
    thetas = []
    for k in range(3):
        result = train(model, data, cfg, 1.0 + fd_step * k * v)
        thetas.append(flat_params(result.params))
        if on_trained is not None:
            on_trained(k, result)
    return {
        "score": score(*thetas),
        "fd_step": fd_step,
        "direction_seed": direction_seed,
        "total_movement_l1": float((thetas[2] - thetas[0]).abs().sum()),
    }
