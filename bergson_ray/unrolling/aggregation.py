"""Per-checkpoint statistics -> one Hessian per segment (bergson's steps 2 and 4).

Within a segment SOURCE uses one eigenbasis for all its checkpoints:

* the Kronecker factors are the *pooled* covariances of the segment's checkpoints,
  ``A_l = Σ_c A_c`` and ``S_l = Σ_c S_c`` over ``N_l = Σ_c N_c`` positions, eigendecomposed
  as any KFAC fit (``hessians/factored.py: fit_kronecker``);
* the EK-FAC eigenvalues are each checkpoint's ``Σ_n (Q_Gᵀ G_n Q_A)²`` in *that* basis,
  pooled and divided by the segment's documents: ``σ_l = Σ_c Λ_c / Σ_c D_c``.

The same per-document scale as our ``hessian --ev_correction`` grids, so a one-checkpoint
segment is exactly that checkpoint's EK-FAC fit.

:class:`OrderedSum` adds the worker contributions of one checkpoint in chunk order, in
fp64, so the result does not depend on how many workers produced them or when they
arrived.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from ..config import HessianConfig
from ..hessians.accumulator import Factors
from ..hessians.factored import KroneckerFactors, fit_kronecker
from ..hessians.specs import ModuleSpec, empty_factor_accumulators

State = dict[str, dict[str, torch.Tensor]]
"""module -> accumulator ``state_dict()`` (what one job returns)."""


class OrderedSum:
    """Sum of ``total`` indexed contributions, added in index order whatever the arrival order."""

    def __init__(self, total: int):
        if total < 1:
            raise ValueError("an ordered sum needs at least one contribution")
        self.total = total
        self.next = 0
        self.pending: dict[int, State] = {}
        self.sum: State | None = None
        self.extra: dict[str, int] = {}

    def add(self, index: int, state: Mapping[str, Mapping[str, torch.Tensor]], **counts: int) -> bool:
        """Take contribution ``index`` (each index once); True when all have been added."""
        if index < self.next or index in self.pending or not 0 <= index < self.total:
            raise ValueError(f"contribution {index} of {self.total} given twice or out of range")
        self.pending[index] = {m: dict(s) for m, s in state.items()}
        for key, val in counts.items():
            self.extra[key] = self.extra.get(key, 0) + int(val)
        while self.next in self.pending:
            part = self.pending.pop(self.next)
            if self.sum is None:
                self.sum = {m: {k: t.to(torch.float64).clone() if t.is_floating_point() else t.clone()
                                for k, t in s.items()} for m, s in part.items()}
            else:
                if set(part) != set(self.sum):
                    raise ValueError("contributions cover different modules")
                for m, s in part.items():
                    for k, t in s.items():
                        self.sum[m][k] += t.to(self.sum[m][k].dtype)
            self.next += 1
        return self.done

    @property
    def done(self) -> bool:
        return self.next == self.total

    def result(self) -> State:
        if not self.done or self.sum is None:
            raise ValueError(f"only {self.next} of {self.total} contributions added")
        return self.sum


def finalize_factors(
    summed: State, specs: Mapping[str, ModuleSpec], hessian: HessianConfig
) -> dict[str, Factors]:
    """Each module's final factors from its summed accumulator state (in fp64: TKFAC and
    Shampoo post-process their sums here, KFAC returns them as they are)."""
    wide = dataclasses.replace(hessian, hessian_dtype="fp64")
    accs = empty_factor_accumulators(specs, wide)
    missing = sorted(set(specs) - set(summed))
    if missing:
        raise ValueError(f"no factor sums for module(s) {missing[:3]}")
    out = {}
    for name, acc in accs.items():
        acc.merge(summed[name])
        out[name] = acc.finalize()  # type: ignore[attr-defined]
    return out


def segment_factors(
    checkpoints: Sequence[Mapping[str, Factors]],
    documents: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
) -> dict[str, KroneckerFactors]:
    """The segment's Kronecker factors and eigenbases from its checkpoints' factor sums."""
    if not checkpoints:
        raise ValueError("a segment needs at least one checkpoint")
    names = list(checkpoints[0])
    for c in checkpoints[1:]:
        if set(c) != set(names):
            raise ValueError("the segment's checkpoints have different modules")
    out = {}
    for name in names:
        a = sum(c[name].A.to(torch.float64) for c in checkpoints)
        s = sum(c[name].S.to(torch.float64) for c in checkpoints)
        n = sum(int(c[name].count) for c in checkpoints)
        out[name] = fit_kronecker(
            Factors(a, s, n), num_documents=int(sum(documents)), dtype=dtype, name=name  # type: ignore[arg-type]
        )
    return out


def segment_lambdas(
    lambda_sums: Sequence[Mapping[str, torch.Tensor]],
    documents: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """``σ_l = Σ_c Λ_c / Σ_c D_c`` per module (the per-document mean EK-FAC eigenvalues)."""
    if not lambda_sums:
        raise ValueError("a segment needs at least one checkpoint")
    total = max(int(sum(documents)), 1)
    names = list(lambda_sums[0])
    return {
        name: (sum(c[name].to(torch.float64) for c in lambda_sums) / total).to(dtype)  # type: ignore[union-attr]
        for name in names
    }


def with_correction(
    factors: Mapping[str, KroneckerFactors], correction: Mapping[str, torch.Tensor]
) -> dict[str, KroneckerFactors]:
    """The segment factors carrying their EK-FAC eigenvalues."""
    missing = sorted(set(factors) - set(correction))
    if missing:
        raise ValueError(f"no EK-FAC eigenvalues for module(s) {missing[:3]}")
    return {n: dataclasses.replace(kf, correction=correction[n]) for n, kf in factors.items()}
