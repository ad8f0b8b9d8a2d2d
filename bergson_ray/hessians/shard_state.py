"""What one Hessian shard owns: the merged sums of its modules and their results.

The Ray actor (``actors/hessian_shard.py``) is a thin wrapper around this class
so that the math, the bookkeeping and their tests need no Ray. A shard

1. merges each worker's pre-summed contribution once (keyed, so a re-sent
   contribution is ignored rather than double counted),
2. eigendecomposes its own modules (fp64) when told the data is complete,
3. merges EK-FAC corrections in a second pass, and
4. hands out the row blocks of its tensors for any number of output files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch

from ..config import HessianConfig
from ..utils.dtypes import torch_dtype
from .accumulator import COUNT, SummedState
from .autocorrelation import GramAccumulator
from .eigen import eigh_fp64
from .factored import KroneckerFactors, fit_kronecker
from .factored_io import shard_slices
from .specs import ModuleSpec, empty_factor_accumulators

log = logging.getLogger(__name__)

State = Mapping[str, Mapping[str, torch.Tensor]]


class ShardState:
    """Accumulators and results for the modules one shard owns.

    ``modules`` maps name -> :class:`ModuleSpec` (factored methods) or -> block
    width ``d`` (autocorrelation).
    """

    def __init__(self, modules: Mapping[str, ModuleSpec | int], cfg: HessianConfig):
        self.cfg = cfg
        self.dtype = torch_dtype(cfg.hessian_dtype)
        self.names = list(modules)
        if cfg.factored:
            self.acc: dict[str, SummedState] = empty_factor_accumulators(modules, cfg)  # type: ignore[arg-type]
        else:
            self.acc = {n: GramAccumulator(int(d), dtype=self.dtype) for n, d in modules.items()}  # type: ignore[arg-type]
        self.correction: dict[str, SummedState] = {}
        self.merged: dict[str, set[str]] = {"factors": set(), "correction": set()}
        self.results: dict[str, KroneckerFactors] = {}
        self.dense: dict[str, torch.Tensor] = {}
        self.dense_eigen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.seconds: dict[str, float] = {}
        self._final_counts: dict[str, int] | None = None

    # ------------------------------------------------------------------ merging
    def _merge(self, target: dict[str, SummedState], kind: str, key: str, state: State) -> bool:
        if key in self.merged[kind]:
            log.info("ignoring re-sent %s contribution %s", kind, key)
            return False
        if set(state) != set(target):
            raise ValueError(
                f"contribution {key} covers {sorted(state)[:3]}..., shard owns {sorted(target)[:3]}..."
            )
        for name, st in state.items():
            target[name].merge(st)
        self.merged[kind].add(key)
        return True

    def merge(self, key: str, state: State) -> bool:
        """Add one worker's factor (or Gram) sums; False if ``key`` was merged before."""
        return self._merge(self.acc, "factors", key, state)

    def counts(self, kind: str = "factors") -> dict[str, int]:
        """Positions (factored) or rows (dense) merged per module."""
        if kind == "factors" and self._final_counts is not None:
            return dict(self._final_counts)
        target = self.acc if kind == "factors" else self.correction
        return {n: a.count for n, a in target.items()}

    # ----------------------------------------------------------- factored results
    def finalize(self, num_documents: int) -> dict[str, float]:
        """Eigendecompose every owned module; returns seconds per module (idempotent)."""
        if self._final_counts is not None:
            return dict(self.seconds)
        t0 = time.perf_counter()
        if self.cfg.factored:
            for name in self.names:
                t = time.perf_counter()
                self.results[name] = fit_kronecker(
                    self.acc[name].finalize(),  # type: ignore[attr-defined]
                    num_documents=num_documents,
                    dtype=self.dtype,
                    name=name,
                )
                self.seconds[name] = time.perf_counter() - t
        else:
            for name in self.names:
                t = time.perf_counter()
                h = self.acc[name].finalize()  # type: ignore[attr-defined]
                self.dense[name] = h.to(self.dtype)
                self.dense_eigen[name] = eigh_fp64(h, 1, name=name, dtype=self.dtype)
                self.seconds[name] = time.perf_counter() - t
        # The sums now live on in the results; drop the accumulators (memory ~ halves).
        self._final_counts = self.counts()
        self.acc.clear()
        log.info("shard: %d modules finalized in %.2fs", len(self.names), time.perf_counter() - t0)
        return dict(self.seconds)

    def eigenbases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``module -> (Q_A, Q_G)`` for the EK-FAC pass."""
        return {n: (kf.q_a, kf.q_g) for n, kf in self.results.items()}

    def start_correction(self) -> None:
        """Open the EK-FAC sums (idempotent: a replayed call keeps what was merged)."""
        if self.correction:
            return
        self.correction = {
            name: SummedState(
                {
                    "lambda": torch.zeros(kf.shape, dtype=self.dtype),
                    COUNT: torch.zeros((), dtype=torch.int64),
                }
            )
            for name, kf in self.results.items()
        }
        self.merged["correction"] = set()

    def merge_correction(self, key: str, state: State) -> bool:
        return self._merge(self.correction, "correction", key, state)

    def finalize_correction(self, num_documents: int) -> None:
        """``Λ* / D``: the per-document mean, like the uncorrected grid (bergson 2.5)."""
        for name, st in self.correction.items():
            self.results[name].correction = (
                st.state_dict()["lambda"].double() / max(num_documents, 1)
            ).to(self.dtype)

    def file_slices(self, num_files: int) -> list[dict[str, dict[str, torch.Tensor]]]:
        """For each output file ``r``, ``subdir -> {module: row block r}`` of owned modules."""
        return [shard_slices(self.results, r, num_files) for r in range(num_files)]

    # -------------------------------------------------------------------- memory
    @property
    def nbytes(self) -> int:
        """Bytes of tensors this shard holds (accumulators, results)."""
        total = sum(a.nbytes for a in self.acc.values())
        total += sum(a.nbytes for a in self.correction.values())
        for kf in self.results.values():
            for t in (
                kf.q_a,
                kf.q_g,
                kf.eigenvalues,
                kf.factor_eig_a,
                kf.factor_eig_g,
                kf.correction,
                kf.A,
                kf.S,
            ):
                if t is not None:
                    total += t.numel() * t.element_size()
        for h in self.dense.values():
            total += h.numel() * h.element_size()
        for v, q in self.dense_eigen.values():
            total += (v.numel() + q.numel()) * q.element_size()
        return total
