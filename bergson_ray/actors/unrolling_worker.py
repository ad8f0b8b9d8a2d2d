"""Workers of ``approxunrolling``: one pool of plain actors for every pass over the data.

SOURCE reads the training set three times at every checkpoint: factor sums (KFAC
covariances), EK-FAC eigenvalues in the segment's eigenbasis, and scores against the
segment's transformed query. A job is one chunk of rows at one checkpoint for one of
these passes; the actor keeps the checkpoint's model (and its fitter) between jobs,
so jobs queued checkpoint by checkpoint load each model about once per pass (a CPU
worker keeps a few loaded). Chunks
are cut independently of the number of workers and the driver adds their sums in
chunk order (``unrolling/aggregation.py: OrderedSum``), so the results do not depend on
how many workers ran. ``job_pool.py`` resubmits a job whose actor died.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch

from ..config import BatchConfig, DataConfig, GradientConfig, HessianConfig, ModelConfig
from ..utils.ray_env import node_id
from .job_pool import JobPool, peak_rss_mib

log = logging.getLogger(__name__)

PassKind = Literal["query", "factors", "lambda", "scores"]
CPU_CACHED_MODELS = 3
"""Checkpoint models a CPU worker keeps loaded between jobs (a GPU worker keeps one)."""


@dataclass(frozen=True)
class PassJob:
    """Rows ``[lo, hi)`` at checkpoint ``checkpoint`` for one pass: of the query set
    (``query``: its gradients, or their sum with ``source="sum"``) or of the training set."""

    kind: PassKind
    checkpoint: int
    chunk: int
    lo: int
    hi: int
    source: str = ""
    """``lambda``: the segment Hessian dir holding the eigenbasis; ``scores``: the
    segment's transformed query store."""

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.checkpoint, self.chunk)


@dataclass
class UnrollingSpec:
    """What every worker needs; the model of ``model`` is replaced per checkpoint."""

    checkpoints: list[str]
    """HF model dirs, in trajectory order."""
    model: ModelConfig
    data: DataConfig
    grad: GradientConfig
    batch: BatchConfig
    hessian: HessianConfig
    skip_short_docs: bool = False
    device: str = "cpu"
    torch_threads: int = 0
    query_batch_size: int | None = None
    query: DataConfig | None = None
    """The query set (``query`` jobs), None when the query store is given."""


class UnrollingWorker:
    """Ray actor (through :class:`JobPool`): runs :class:`PassJob` after :class:`PassJob`."""

    def __init__(self, spec: UnrollingSpec, faults: Any = None):
        if spec.torch_threads > 0:
            torch.set_num_threads(spec.torch_threads)
        if spec.device == "auto":
            spec.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.spec = spec
        self.faults = faults
        self.jobs_done = 0
        self._runners: dict[tuple[int, bool], Any] = {}
        # One model per worker on a GPU (memory); a few on CPU, where a tiny model's
        # reload would cost more than the pass (checkpoints x 4 passes per worker).
        self.cached_models = 1 if spec.device == "cuda" else CPU_CACHED_MODELS
        self._fitter: tuple[tuple, Any] | None = None
        self._query: tuple[str, torch.Tensor] | None = None
        self.node = node_id()

    # -- cached state ------------------------------------------------------------
    def runner(self, checkpoint: int, query: bool = False):
        """The checkpoint's model, tokenizer and gradient engine reading the training set
        (or the query set); one cached at a time."""
        from ..runners.gradient_runner import GradientRunner, RunnerSpec

        key = (checkpoint, query)
        if key in self._runners:
            self._runners[key] = self._runners.pop(key)  # most recently used last
        else:
            while len(self._runners) >= self.cached_models:
                self._runners.pop(next(iter(self._runners)))
            self._fitter = None
            model = replace(self.spec.model, model=self.spec.checkpoints[checkpoint])
            data = self.spec.query if query else self.spec.data
            if data is None:
                raise ValueError("a query job needs the query set in the spec")
            spec = RunnerSpec(
                model=model,
                grad=self.spec.grad,
                data=data,
                batch=self.spec.batch,
                skip_short_docs=self.spec.skip_short_docs,
                device=self.spec.device,
            )
            self._runners[key] = GradientRunner(spec)
        return self._runners[key]

    def fitter(self, job: PassJob):
        """Factor sums (``factors``) or EK-FAC sums in the segment's basis (``lambda``)."""
        from ..hessians.factored_io import read_factored
        from ..hessians.fitter import FactorFitter

        key = (job.checkpoint, job.kind, job.source)
        if self._fitter is None or self._fitter[0] != key:
            runner = self.runner(job.checkpoint)
            bases = None
            if job.kind == "lambda":
                bases = {n: (kf.q_a, kf.q_g) for n, kf in read_factored(job.source).items()}
            fitter = FactorFitter(
                runner.engine.model, self.spec.grad, self.spec.hessian, eigenbases=bases
            )
            self._fitter = (key, fitter)
        return self._fitter[1]

    def query(self, path: str) -> torch.Tensor:
        from ..store.gradient_store import GradientStore

        if self._query is None or self._query[0] != path:
            store = GradientStore.open(path)
            self._query = (path, store.rows(np.arange(store.num_grads)).float())
        return self._query[1]

    # -- jobs ----------------------------------------------------------------------
    def run(self, job: PassJob) -> dict[str, Any]:
        idx = np.arange(job.lo, job.hi, dtype=np.int64)
        if job.kind == "query":
            runner = self.runner(job.checkpoint, query=True)
            if job.source == "sum":
                total = torch.from_numpy(runner.partial_sum(idx)["sum"])
                result: dict[str, Any] = {"state": {"query": {"sum": total}}, "documents": len(idx),
                                          "positions": 0}  # fmt: skip
            else:
                result = {"idx": idx, "grads": runner.gradients(idx)["grads"]}
        elif job.kind == "scores":
            out = self.runner(job.checkpoint).scores(
                idx, self.query(job.source), "individual", self.spec.query_batch_size
            )
            result = {"idx": out["idx"], "scores": out["scores"]}
        else:
            result = self._sums(job, idx)
        self.jobs_done += 1
        if self.faults is not None:
            # the crash seam of Ray Data workers: after the work, before the result returns
            self.faults.after_batch(self.jobs_done, self.node)
        return result

    def _sums(self, job: PassJob, idx: np.ndarray) -> dict[str, Any]:
        from ..data.batching import collate

        runner = self.runner(job.checkpoint)
        fitter = self.fitter(job)
        docs = runner.tokenize(idx)
        positions = 0
        for members in runner.batches(docs):
            batch = collate([docs[j] for j in members])
            positions += fitter.accumulate_batch(batch, torch.from_numpy(idx[members]))
        states = {m: {k: t.clone() for k, t in st.items()} for m, st in fitter.state_dicts().items()}
        fitter.reset()
        return {"state": states, "documents": len(idx), "positions": positions}

    def peak_rss_mib(self) -> float:
        return peak_rss_mib()


def UnrollingPool(
    spec: UnrollingSpec, size: int, *, num_cpus: float, num_gpus: float, faults: Any = None,
    local: bool = False,
) -> JobPool:
    """``size`` :class:`UnrollingWorker` actors (``local``: one, in this process); jobs are
    :class:`PassJob`."""
    return JobPool(
        UnrollingWorker, spec, size, num_cpus=num_cpus, num_gpus=num_gpus, faults=faults,
        what="approxunrolling job", key=lambda job: job.key, local=local,
    )
