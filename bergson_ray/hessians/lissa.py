"""LiSSA: stochastic estimates of ``(G + damping I)^-1 q`` from Hessian-vector products.

Agarwal et al. (2017, https://arxiv.org/abs/1602.03943); as an influence estimator,
Bae et al. (2022, https://arxiv.org/abs/2209.05364). With ``A = G + damping I`` and
``h_0 = q``, each of ``depth`` steps draws a fresh batch ``B`` of training documents and
applies

    h_{j+1} = q + (I - (G_B + damping I) / scale) h_j

so ``h_j / scale`` is the truncated Neumann series ``sum_{t<=j} (I - A/scale)^t q / scale``,
which tends to ``A^-1 q`` when every eigenvalue of ``A / scale`` lies in ``(0, 2)``, i.e.
when ``scale`` exceeds half the largest eigenvalue of the damped Hessian. ``repeats``
independent runs are averaged. This is bergson 2.5.1's recursion, step for step,
including its random batches: a query's generator is seeded with
``seed * 1_000_003 + row`` and each step takes the first ``batch_size`` entries of one
``randperm`` of the training set, repeats following each other on that generator.
:func:`repeat_generator` replays the draws of the earlier repeats, so a single repeat can
run anywhere (another worker, a resumed run) and still see bergson's batches.

A ``scale`` that is too small makes the series grow geometrically instead of
converging. :func:`check_scale` estimates the largest eigenvalue of a batch's
Gauss-Newton Hessian by power iteration before the series starts, and
:func:`lissa_repeat` watches the estimate's norm against what a converging series can
reach; both fail with one sentence that says to raise ``--scale``.

Pure torch: the Hessian enters only as ``product(v, indices) -> G_B v`` on dicts of flat
per-module blocks (``hessians/gauss_newton.py`` gives the Gauss-Newton one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import BadInputError

log = logging.getLogger(__name__)

Blocks = dict[str, Tensor]
Product = Callable[[Mapping[str, Tensor], list[int]], Mapping[str, Tensor]]
"""``product(v, indices)``: ``G_B v`` on the training documents ``indices`` (a mean over them)."""

SEED_STRIDE = 1_000_003
"""bergson's per-query seed: ``seed * SEED_STRIDE + row``."""
CHECK_EVERY = 25
"""Steps between two divergence checks (a norm costs a device sync)."""
DIVERGENCE_SLACK = 10.0
"""How far past the bound of a converging deterministic series the stochastic one may go."""
POWER_ITERATIONS = 8
"""Hessian-vector products spent estimating the largest eigenvalue before the series."""


@dataclass(frozen=True)
class LissaSettings:
    """The series' knobs (bergson's ``LissaConfig`` without the run-level options)."""

    damping: float = 0.01
    scale: float = 100.0
    depth: int = 5000
    batch_size: int = 16


def query_generator(seed: int, row: int) -> torch.Generator:
    """The CPU generator of query ``row``'s batches (bergson's seeding)."""
    return torch.Generator().manual_seed(seed * SEED_STRIDE + row)


def draw_batch(num_docs: int, batch_size: int, gen: torch.Generator) -> list[int]:
    """One step's training documents: the head of a fresh permutation."""
    return torch.randperm(num_docs, generator=gen)[:batch_size].tolist()


def repeat_generator(seed: int, row: int, repeat: int, num_docs: int, depth: int) -> torch.Generator:
    """Query ``row``'s generator positioned where repeat ``repeat`` starts.

    bergson runs a query's repeats one after the other on one generator, so repeat ``r``
    starts after ``r * depth`` permutations; replaying them (cheap next to a Hessian-vector
    product) makes every repeat an independent job with bergson's exact batches.
    """
    gen = query_generator(seed, row)
    for _ in range(repeat * depth):
        torch.randperm(num_docs, generator=gen)
    return gen


def blocks_norm(v: Mapping[str, Tensor]) -> float:
    """Euclidean norm of the concatenated blocks (accumulated in float64)."""
    return math.sqrt(sum(float(x.double().pow(2).sum()) for x in v.values()))


def divergence_bound(q_norm: float, steps: int, settings: LissaSettings) -> float:
    """Largest ``||h_steps||`` a converging series reaches, with slack for noise.

    With every eigenvalue ``a`` of ``A / scale`` in ``(0, 2)``, each eigencomponent of
    ``h_j`` is ``q_i * sum_{t<=j} (1 - a)^t``, at most ``(j + 1) |q_i|`` and at most
    ``2 |q_i| scale / damping`` in size. A diverging series grows geometrically and
    passes this bound quickly.
    """
    reach = float(steps + 1)
    if settings.damping > 0:
        reach = min(reach, 2.0 * settings.scale / settings.damping)
    return DIVERGENCE_SLACK * max(q_norm, 1e-30) * max(reach, 1.0)


def scale_error(settings: LissaSettings, detail: str) -> BadInputError:
    """The one sentence for a ``scale`` under which the series cannot converge."""
    return BadInputError(
        f"--scale {settings.scale:g} is too small for the LiSSA series to converge ({detail}); "
        "raise --scale above half the largest eigenvalue of the damped Gauss-Newton Hessian"
    )


def lissa_repeat(
    product: Product,
    q: Mapping[str, Tensor],
    num_docs: int,
    settings: LissaSettings,
    gen: torch.Generator,
    *,
    label: str = "",
) -> Blocks:
    """One run of the recursion from ``h_0 = q``; returns the final ``h`` (not yet
    divided by ``scale``: :func:`combine_repeats` does that, as bergson does)."""
    if num_docs < 1:
        raise BadInputError("LiSSA needs at least one training document")
    h = {n: v.clone() for n, v in q.items()}
    q_norm = blocks_norm(q)
    d, s = settings.damping, settings.scale
    for step in range(settings.depth):
        gh = product(h, draw_batch(num_docs, settings.batch_size, gen))
        for n in h:
            h[n] += q[n] - (gh[n] + d * h[n]) / s
        done = step + 1
        if done % CHECK_EVERY == 0 or done == settings.depth:
            norm = blocks_norm(h)
            if not math.isfinite(norm) or norm > divergence_bound(q_norm, done, settings):
                raise scale_error(
                    settings, f"{label + ': ' if label else ''}the estimate's norm reached "
                    f"{norm:.3g} after {done} of {settings.depth} steps, growing instead of settling"
                )
            if done % 500 == 0:
                log.info("%s step %d: estimate norm %.6g", label, done, norm / s)
    return h


def combine_repeats(repeats: list[Mapping[str, Tensor]], scale: float) -> Blocks:
    """Mean of the repeats' ``h / scale``, summed in repeat order (bergson's arithmetic)."""
    if not repeats:
        raise ValueError("combine_repeats needs at least one repeat")
    count = len(repeats)
    out = {n: torch.zeros_like(v) for n, v in repeats[0].items()}
    for h in repeats:
        for n in out:
            out[n] += h[n] / (scale * count)
    return out


def lissa(
    product: Product,
    q: Mapping[str, Tensor],
    num_docs: int,
    settings: LissaSettings,
    repeats: int,
    gen: torch.Generator,
    *,
    label: str = "",
) -> Blocks:
    """``(G + damping I)^-1 q`` estimated by ``repeats`` runs on one generator, in order."""
    runs = [
        lissa_repeat(product, q, num_docs, settings, gen, label=f"{label} repeat {r}")
        for r in range(repeats)
    ]
    return combine_repeats(runs, settings.scale)


def top_eigenvalue(
    product: Product,
    like: Mapping[str, Tensor],
    indices: list[int],
    *,
    iterations: int = POWER_ITERATIONS,
    seed: int = 0,
) -> float:
    """Power-iteration estimate (a lower bound) of the largest eigenvalue of ``G_B``."""
    gen = torch.Generator().manual_seed(seed)
    v = {n: torch.randn(x.shape, generator=gen).to(x) for n, x in like.items()}
    norm = blocks_norm(v)
    v = {n: x / norm for n, x in v.items()}
    estimate = 0.0
    for _ in range(iterations):
        gv = product(v, indices)
        estimate = sum(float((v[n].double() * gv[n].double()).sum()) for n in v)  # Rayleigh
        norm = blocks_norm(gv)
        if not math.isfinite(norm) or norm == 0.0:
            return norm if not math.isfinite(norm) else 0.0
        v = {n: x / norm for n, x in gv.items()}
    return max(estimate, 0.0)


def check_scale(
    product: Product,
    like: Mapping[str, Tensor],
    num_docs: int,
    settings: LissaSettings,
    *,
    seed: int = 0,
    iterations: int = POWER_ITERATIONS,
) -> float:
    """Fail before the series starts when ``scale`` is plainly too small.

    Estimates the largest eigenvalue of the Gauss-Newton Hessian on one batch of
    ``batch_size`` documents (its own generator: the series' batches are untouched) and
    requires ``(lambda_max + damping) / scale < 2``. Returns the estimate.
    """
    gen = torch.Generator().manual_seed((seed + 1) * SEED_STRIDE - 1)  # not a query's seed
    indices = draw_batch(num_docs, settings.batch_size, gen)
    lam = top_eigenvalue(product, like, indices, iterations=iterations, seed=seed)
    if not math.isfinite(lam) or lam + settings.damping >= 2.0 * settings.scale:
        raise scale_error(
            settings, f"a batch's Gauss-Newton Hessian has an eigenvalue of about {lam:.4g}, "
            f"so --scale must exceed {(lam + settings.damping) / 2:.4g}"
        )
    if lam + settings.damping > settings.scale:
        log.warning(
            "LiSSA: the largest eigenvalue on one batch is about %.4g, above --scale %g "
            "(the series converges only below 2 x scale); raise --scale if it diverges",
            lam, settings.scale,
        )
    return lam


__all__ = [
    "LissaSettings",
    "Product",
    "blocks_norm",
    "check_scale",
    "combine_repeats",
    "divergence_bound",
    "draw_batch",
    "lissa",
    "lissa_repeat",
    "query_generator",
    "repeat_generator",
    "top_eigenvalue",
]
