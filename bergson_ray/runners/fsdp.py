"""One rank of an FSDP group: a GradientRunner over a sharded model, kept in lockstep.

The sharding itself (process group, ``fully_shard``) is pure torch and lives in
``gradients/fsdp.py``. Ranks work data-parallel: each gets its own documents. FSDP's
collectives need every rank to run the same number of forward/backward passes, so
:func:`make_lockstep` patches a :class:`~bergson_ray.runners.gradient_runner.GradientRunner`
so that

* after tokenizing, the ranks agree whether anyone hit a user error (then all raise,
  instead of the healthy ranks waiting forever for the failed one), and
* before packing, they agree on the largest number of micro-batches; a rank with
  fewer runs throw-away 2-token passes to keep up.

The same patched runner serves ``gradients``, ``scores`` and ``partial_sum``.
:class:`FsdpRank` is the plain class the group leader (``runners/sharded.py``) starts
as a Ray actor, one per rank.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
import torch.distributed as dist

from ..errors import BergsonRayError
from ..gradients.fsdp import backend_for, destroy_group, init_group, shard_model
from ..utils.net import free_port
from .gradient_runner import GradientRunner, RunnerSpec

log = logging.getLogger(__name__)


class PeerFailedError(BergsonRayError):
    """Another rank of the group failed on its share of a batch (it reports the cause)."""


def _agree_max(value: int, device: torch.device) -> int:
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def dummy_doc():
    """A 2-token document: the cheapest pass that runs every FSDP collective."""
    from ..data.tokenize import TokenizedDoc

    ids = np.zeros(2, dtype=np.int64)
    return TokenizedDoc(input_ids=ids, labels=ids.copy())


def make_lockstep(runner: GradientRunner, comm_device: str | torch.device = "cpu"):
    """Patch ``runner`` (a GradientRunner whose model is sharded) to run in lockstep."""
    from ..data.batching import collate

    device = torch.device(comm_device)
    tokenize, batches = runner.tokenize, runner.batches

    def lockstep_tokenize(idx):
        # Any failure here must reach the other ranks too, or they wait forever below.
        err: Exception | None = None
        docs: list = []
        try:
            docs = tokenize(idx) if len(idx) else []  # a share can be empty
        except Exception as e:  # noqa: BLE001
            err = e
        if _agree_max(err is not None, device):
            raise err or PeerFailedError("another rank of the sharded group failed")
        return docs

    def lockstep_run_docs(docs):
        plan = batches(docs)
        rounds = _agree_max(len(plan), device)
        for positions in plan:
            yield positions, runner.engine.compute(collate([docs[j] for j in positions]))
        for _ in range(rounds - len(plan)):
            runner.engine.compute(collate([dummy_doc()]))

    runner.tokenize = lockstep_tokenize
    runner.run_docs = lockstep_run_docs
    return runner


def build_sharded_runner(spec: RunnerSpec, device: str) -> GradientRunner:
    """A GradientRunner whose model is FSDP-sharded over the (initialized) group.

    The model is loaded on CPU (each rank reads the full checkpoint into host memory
    once), sharded, and only the shards move to ``device``; everything after the
    engine (preprocessing, scoring) stays on CPU as in the unsharded path.
    """
    runner = GradientRunner(dataclasses.replace(spec, device="cpu"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    shard_model(runner.engine.model, dev)
    runner.engine.device = dev
    make_lockstep(runner, dev if backend_for(str(dev)) == "nccl" else "cpu")
    return runner


class FsdpRank:
    """One rank: a shard of the model and a lockstep GradientRunner (a Ray actor)."""

    def __init__(self, spec: RunnerSpec, rank: int, world: int, device: str, torch_threads: int):
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.spec, self.rank, self.world, self.device = spec, rank, world, device
        self.runner: GradientRunner | None = None
        self.query = None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: the address the group meets at."""
        import ray

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def setup(self, addr: str, port: int, timeout_s: float) -> str:
        import ray

        if self.device == "cuda":
            torch.cuda.set_device(0)  # Ray shows each rank only its own GPU
        init_group(self.rank, self.world, addr, port, backend_for(self.device), timeout_s)
        self.runner = build_sharded_runner(self.spec, self.device)
        return ray.get_runtime_context().get_node_id()

    def set_query(self, query: np.ndarray) -> None:
        self.query = torch.as_tensor(np.array(query))

    def run(self, method: str, idx: np.ndarray, *args):
        if method == "scores":
            return self.runner.scores(idx, self.query, *args)
        return getattr(self.runner, method)(idx, *args)

    def close(self) -> None:
        destroy_group()
