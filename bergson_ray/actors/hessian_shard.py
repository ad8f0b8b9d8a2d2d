"""Ray actors of the ``hessian`` command: accumulator shards and the workers feeding them.

* :class:`HessianShard` (``num_cpus=0``) owns a subset of modules: it merges the
  workers' pre-summed contributions, eigendecomposes its modules (all shards in
  parallel) and writes its row blocks of the output files. Memory per shard is
  about the total over ``K``.
* :class:`HessianWorker` owns one model replica and sums Hessian statistics over
  every window of rows the driver gives it, then hands over one contribution per
  shard. It is a plain actor rather than a Ray Data UDF because a UDF has no
  end-of-stream hook: the point is to send once per worker, not once per batch.

Both are plain classes, made Ray actors by :data:`RemoteHessianShard` and
:data:`RemoteHessianWorker`; a one-worker fit on one machine uses them in the driver's
process instead. Both are thin: the math and bookkeeping are :class:`~bergson_ray.hessians.shard_state.ShardState`
and :class:`~bergson_ray.runners.hessian_runner.HessianRunner`. Shards never restart by
themselves (``max_restarts=0``): a restarted actor would come back empty and
silently drop data, so the driver notices the death and decides (replace and
re-send, or fail).
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Mapping

import torch

from .local_handles import lazy_actor_classes

log = logging.getLogger(__name__)


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class HessianShard:
    def __init__(self, shard_id: int, modules: Mapping, cfg, torch_threads: int = 1):
        from ..hessians.shard_state import ShardState

        if torch_threads > 0:  # 0: in the driver's process, whose setting is the worker's
            torch.set_num_threads(torch_threads)
        self.shard_id = shard_id
        self.state = ShardState(modules, cfg)

    def ping(self) -> int:
        return self.shard_id

    def pid(self) -> int:
        return os.getpid()

    def merge(self, key: str, state) -> bool:
        return self.state.merge(key, state)

    def merged(self, kind: str = "factors") -> list[str]:
        return sorted(self.state.merged[kind])

    def counts(self, kind: str = "factors") -> dict[str, int]:
        return self.state.counts(kind)

    def finalize(self, num_documents: int) -> dict[str, float]:
        return self.state.finalize(num_documents)

    def eigenbases(self) -> dict:
        return self.state.eigenbases()

    def start_correction(self) -> None:
        self.state.start_correction()

    def merge_correction(self, key: str, state) -> bool:
        return self.state.merge_correction(key, state)

    def finalize_correction(self, num_documents: int) -> None:
        self.state.finalize_correction(num_documents)

    def export(self, num_files: int):
        """One return value per output file (call with ``.options(num_returns=num_files)``)."""
        parts = self.state.file_slices(num_files)
        return parts[0] if num_files == 1 else tuple(parts)

    def write_file(self, root: str, rank: int, *parts) -> list[str]:
        """Write file ``rank`` of every subdir from all shards' row blocks (refs resolved by Ray)."""
        from ..hessians.factored_io import write_shard_file

        return [str(p) for p in write_shard_file(root, rank, parts)]

    def dense(self) -> tuple[dict, dict]:
        return self.state.dense, self.state.dense_eigen

    def memory(self) -> dict[str, int]:
        return {"tensor_bytes": self.state.nbytes, "peak_rss_bytes": _peak_rss_bytes()}


class HessianWorker:
    """Sums Hessian statistics over every window it is given (see module docstring)."""

    def __init__(self, spec, torch_threads: int = 0, faults=None):
        from ..runners.hessian_runner import HessianRunner

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        if spec.runner.device == "auto":
            spec.runner.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.runner = HessianRunner(spec)
        self.faults = faults  # test-only FaultPlan
        self.windows = 0

    def ready(self) -> bool:
        return True

    def process(self, idx) -> dict[str, int]:
        self.windows += 1
        if self.faults is not None:
            self.faults.before_window(self.windows)  # test hook: the one seam
        return self.runner.process(idx)

    def contributions(self, owners):
        """One state per shard; call with ``.options(num_returns=len(owners))``."""
        parts = self.runner.contributions(owners)
        return parts[0] if len(parts) == 1 else tuple(parts)

    def start_correction(self, *eigenbases) -> None:
        """EK-FAC pass: ``eigenbases`` are the shards' ``{module: (Q_A, Q_G)}`` (refs resolved)."""
        bases: dict = {}
        for part in eigenbases:
            bases.update(part)
        self.runner.start_correction(bases)

    def stats(self) -> dict[str, int]:
        return dict(self.runner.stats)

    def memory(self) -> dict[str, int]:
        return {"peak_rss_bytes": _peak_rss_bytes()}


# The Ray actors. The plain classes above run in the driver's process for a one-worker
# fit on one machine (``pipelines/sharded_fit.py``, ``actors/local_handles.py``).
__getattr__ = lazy_actor_classes(
    __name__,
    RemoteHessianShard=(HessianShard, dict(num_cpus=0, max_restarts=0)),
    RemoteHessianWorker=(HessianWorker, dict(max_restarts=0)),
)
"""``RemoteHessianShard`` / ``RemoteHessianWorker``: the Ray actors (made on first use)."""
