"""Dataset rows in, pre-summed Hessian statistics out: one Hessian worker's job.

:class:`HessianRunner` wraps the gradient runner (model, tokenizer, row reading,
token-budget packing; shared with ``build``) and feeds every packed batch to a
fitter. It keeps summing across all the windows it is given; the pipeline asks
for :meth:`contributions` once at the end, split by owning shard, so what a
worker sends does not grow with the number of batches. Nothing here knows Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..config import HessianConfig
from ..hessians.fitter import FactorFitter, GramFitter
from .gradient_runner import GradientRunner, RunnerSpec

log = logging.getLogger(__name__)

State = dict[str, dict[str, torch.Tensor]]
"""module -> accumulator ``state_dict()``."""

STAT_KEYS = ("documents", "short_documents", "sequences", "positions", "rows", "batches")
"""Per-window counts a worker reports; the driver checks the shards' counts against them."""


@dataclass
class HessianSpec:
    """Everything a Hessian worker needs to rebuild its runner; small and picklable."""

    runner: RunnerSpec
    hessian: HessianConfig


class HessianRunner:
    def __init__(self, spec: HessianSpec):
        self.spec = spec
        self.base = GradientRunner(spec.runner)
        self.model = self.base.engine.model
        self.fitter: FactorFitter | GramFitter = self._factor_fitter()
        self.stats = dict.fromkeys(STAT_KEYS, 0)

    def _factor_fitter(self, eigenbases=None) -> FactorFitter | GramFitter:
        if self.spec.hessian.factored:
            return FactorFitter(
                self.model, self.spec.runner.grad, self.spec.hessian, eigenbases=eigenbases
            )
        return GramFitter(self.base.engine, self.spec.hessian)

    @property
    def modules(self) -> list[str]:
        return list(self.fitter.accumulators)

    def start_correction(self, eigenbases: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Switch to the EK-FAC pass: rotate per-sequence gradients into these bases."""
        self.fitter = self._factor_fitter(eigenbases)
        self.stats = dict.fromkeys(self.stats, 0)

    def process(self, idx: Sequence[int] | np.ndarray) -> dict[str, int]:
        """Accumulate dataset rows ``idx``; returns this window's counts."""
        from ..data.batching import collate

        idx = np.asarray(idx, dtype=np.int64)
        docs = self.base.tokenize(idx)
        short = sum(1 for d in docs if len(d.input_ids) < 2)
        out = dict.fromkeys(STAT_KEYS, 0)
        out.update(documents=len(idx), short_documents=short, sequences=len(idx) - short)
        if isinstance(self.fitter, GramFitter) and not self.spec.runner.grad.attribute_tokens:
            # Per-document Grams divide by len(dataset): short docs are zero rows that count.
            self.fitter.add_empty_rows(short)
            out["rows"] += short
        for positions in self.base.batches(docs):
            batch = collate([docs[j] for j in positions])
            if isinstance(self.fitter, FactorFitter):
                out["positions"] += self.fitter.accumulate_batch(
                    batch, torch.from_numpy(idx[positions])
                )
            else:
                out["rows"] += self.fitter.accumulate_batch(batch)
                out["positions"] += int(sum(max(len(docs[j].input_ids) - 1, 0) for j in positions))
            out["batches"] += 1
        for k, v in out.items():
            self.stats[k] += v
        return out

    def contributions(self, owners: Sequence[Sequence[str]], reset: bool = True) -> list[State]:
        """The running sums, one dict per shard (``owners[k]`` = shard k's modules).

        With ``reset`` the sums are handed over (copied) and restart from zero, so
        a second hand-over can never count the same data twice.
        """
        states = self.fitter.state_dicts()
        if reset:
            states = {m: {k: t.clone() for k, t in st.items()} for m, st in states.items()}
            self.reset()
        return [{name: states[name] for name in group} for group in owners]

    def reset(self) -> None:
        self.fitter.reset()
        self.stats = dict.fromkeys(self.stats, 0)
