"""A runner whose model is sharded over a group of actors (``--fsdp``).

A Ray Data worker of a sharded run (``actors/batch_worker.py`` given a
:class:`GroupPlan` instead of ``OneProcess``) is a light *leader*: its
:class:`ShardedRunner` owns a group of ``world`` :class:`~bergson_ray.runners.fsdp.FsdpRank`
actors, one per GPU (or per CPU slot on CPU clusters), placed together by a placement
group (``STRICT_PACK`` on GPUs: a group's GPUs sit on one node). The ranks form a
``torch.distributed`` group (NCCL on GPUs, gloo on CPUs), shard the model with FSDP2
(``gradients/fsdp.py``) and split every batch of row ids between them; the leader
merges their rows. :class:`ShardedRunner` has GradientRunner's interface, so to the
worker and the pipeline a sharded run looks exactly like a plain one.

If a rank dies (node lost, OOM), the leader tears the group down, builds a new one
and re-runs the batch; if the leader itself dies, its ranks die with it and Ray Data
restarts the leader and re-runs its batches, as for a plain worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import BadInputError, BergsonRayError, unwrap
from .gradient_runner import RunnerSpec

log = logging.getLogger(__name__)


@dataclass
class GroupPlan:
    """Shape and resources of one sharded group (small and picklable)."""

    world: int
    device: str
    """``cuda`` or ``cpu``."""
    num_cpus: float
    num_gpus: float
    """Per rank."""
    torch_threads: int = 0
    resources: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    strategy: str = "PACK"
    timeout_s: float = 1800.0
    max_attempts: int = 3
    """Times one batch is tried on a freshly built group before the error is raised."""

    def build(self, spec: RunnerSpec) -> ShardedRunner:
        """The runner strategy of a Ray Data worker (see ``actors/batch_worker.py``)."""
        if spec.device == "auto":
            spec.device = self.device
        return ShardedRunner(spec, self)


def group_plan(
    ray_cfg, pool, resources: dict | None = None, labels: dict | None = None
) -> GroupPlan:
    """The group for ``--fsdp``: ``num_gpus_per_worker`` GPU ranks, or 2 CPU ranks
    (``--fsdp_shards`` overrides either)."""
    shards = int(getattr(ray_cfg, "fsdp_shards", 0) or 0)
    if pool.device == "cuda":
        per = float(ray_cfg.num_gpus_per_worker)
        if per != int(per) or per < 1:
            raise BadInputError(
                f"--fsdp needs a whole number of GPUs per worker, got --num_gpus_per_worker {per}"
            )
        world = shards or int(per)
        threads, cpus, gpus, strategy = pool.torch_threads, pool.num_cpus, 1.0, "STRICT_PACK"
    else:
        world = shards or 2
        threads = max(1, pool.torch_threads // world) if pool.torch_threads else 0
        cpus, gpus, strategy = pool.num_cpus, 0.0, "PACK"
    if world < 2:
        log.warning("--fsdp with a group of 1 shards nothing (use --num_gpus_per_worker >= 2)")
    return GroupPlan(
        world=world,
        device=pool.device,
        num_cpus=cpus,
        num_gpus=gpus,
        torch_threads=threads,
        resources=dict(resources or {}),
        labels=dict(labels or {}),
        strategy=strategy,
    )


def merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-rank outputs -> one batch (rows concatenated, fp64 partial sums added)."""
    out: dict[str, np.ndarray] = {}
    for key in parts[0]:
        vals = [p[key] for p in parts]
        out[key] = np.sum(vals, axis=0) if key == "sum" else np.concatenate(vals)
    return out


class ShardedRunner:
    """Leader side: same methods as GradientRunner, fanned out over the ranks."""

    def __init__(self, spec: RunnerSpec, group: GroupPlan):
        self.spec, self.group = spec, group
        self.ranks: list = []
        self.pg = None
        self._query_src = None
        self.restarts = 0
        self._start()

    # -- group lifecycle -------------------------------------------------------------
    def _start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        g = self.group
        bundle = {
            k: v for k, v in {"CPU": g.num_cpus, "GPU": g.num_gpus, **g.resources}.items() if v
        }
        if not bundle:
            bundle = {"CPU": 0.01}
        pg_kwargs = {}
        if g.labels:
            pg_kwargs["bundle_label_selector"] = [dict(g.labels)] * g.world
        self.pg = placement_group([dict(bundle)] * g.world, strategy=g.strategy, **pg_kwargs)
        t0 = time.perf_counter()
        ray.get(self.pg.ready())  # waits for the autoscaler if it has to add a node
        from .fsdp import FsdpRank

        rank_cls = ray.remote(FsdpRank)
        self.ranks = [
            rank_cls.options(
                num_cpus=bundle.get("CPU", 0),
                num_gpus=bundle.get("GPU", 0),
                resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")} or None,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=r
                ),
            ).remote(self.spec, r, g.world, g.device, g.torch_threads)
            for r in range(g.world)
        ]
        try:
            addr, port = ray.get(self.ranks[0].rendezvous.remote())
            nodes = ray.get([r.setup.remote(addr, port, g.timeout_s) for r in self.ranks])
        except Exception as exc:
            self._stop()
            err = unwrap(exc)
            if isinstance(err, BergsonRayError):
                raise err from None  # e.g. the model path is missing on the ranks' node
            raise
        self._query_src = None
        log.info(
            "sharded group of %d %s ranks ready in %.1fs on node(s) %s",
            g.world,
            g.device,
            time.perf_counter() - t0,
            sorted({n[:8] for n in nodes}),
        )

    def _stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for r in self.ranks:
            try:
                ray.kill(r, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.ranks = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
            self.pg = None

    def __del__(self):
        try:
            self._stop()
        except Exception:  # noqa: BLE001
            pass

    # -- fan-out ---------------------------------------------------------------------
    def _call(self, method: str, idx: np.ndarray, *args, prepare=None) -> dict[str, np.ndarray]:
        import ray

        from .fsdp import PeerFailedError

        idx = np.asarray(idx, dtype=np.int64)
        last: BaseException | None = None
        for attempt in range(self.group.max_attempts):
            if attempt:
                self.restarts += 1
                log.warning(
                    "sharded group failed (%s); rebuilding it (attempt %d)", last, attempt + 1
                )
                self._stop()
                self._start()
            try:
                if prepare is not None:
                    prepare()
                world = len(self.ranks)
                refs = [
                    r.run.remote(method, idx[k::world], *args) for k, r in enumerate(self.ranks)
                ]
            except Exception as exc:  # noqa: BLE001 - a rank died between batches
                last = exc
                continue
            results: dict = {}
            user_errors: list[BergsonRayError] = []
            pending = list(refs)
            last = None
            while pending and last is None:
                ready, pending = ray.wait(pending, num_returns=1)
                try:
                    results[ready[0]] = ray.get(ready[0])
                except Exception as exc:  # noqa: BLE001
                    err = unwrap(exc)
                    if isinstance(err, BergsonRayError):
                        user_errors.append(err)
                    else:
                        last = exc  # a dead rank: the others may wait forever, rebuild
            if last is not None:
                continue
            if user_errors:  # every rank answered: report the root cause
                real = [e for e in user_errors if not isinstance(e, PeerFailedError)]
                raise (real or user_errors)[0]
            return merge([results[r] for r in refs])
        raise RuntimeError(
            f"sharded group failed {self.group.max_attempts} times: {last}"
        ) from last

    def _ensure_query(self, query) -> None:
        import ray

        if self._query_src is query:
            return
        arr = query.detach().cpu().numpy() if hasattr(query, "detach") else np.asarray(query)
        ref = ray.put(arr)
        ray.get([r.set_query.remote(ref) for r in self.ranks])
        self._query_src = query

    # -- GradientRunner's interface --------------------------------------------------
    def gradients(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return self._call("gradients", idx)

    def partial_sum(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return self._call("partial_sum", idx)

    def scores(self, idx: np.ndarray, query, mode: str, query_batch_size: int | None):
        return self._call(
            "scores", idx, mode, query_batch_size, prepare=lambda: self._ensure_query(query)
        )
