"""Per-example gradients from a model sharded with FSDP2 (pure torch, no Ray).

A model too big for one device is split over a ``torch.distributed`` group: every
rank holds ``1/world`` of each parameter and all-gathers a block's weights just for
that block's forward (and again for its backward). Activations are never sharded,
so the module taps of :class:`~bergson_ray.gradients.engine.GradientEngine` see the
same ``a [N,S,I]`` and ``g [N,S,O]`` as on one device and the per-example rows are
the same numbers (only float summation order may differ).

Ranks work data-parallel: each gets its own documents. FSDP's collectives need every
rank to run the same number of forward/backward passes, so :func:`make_lockstep`
patches a :class:`~bergson_ray.gradients.runner.GradientRunner` so that

* after tokenizing, the ranks agree whether anyone hit a user error (then all raise,
  instead of the healthy ranks waiting forever for the failed one), and
* before packing, they agree on the largest number of micro-batches; a rank with
  fewer runs throw-away 2-token passes to keep up.

The same patched runner serves ``gradients``, ``scores`` and ``partial_sum``.
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import BergsonRayError

log = logging.getLogger(__name__)


class PeerFailedError(BergsonRayError):
    """Another rank of the group failed on its share of a batch (it reports the cause)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def init_group(
    rank: int, world: int, addr: str, port: int, backend: str, timeout_s: float = 1800.0
) -> None:
    """Join the process group (``tcp://addr:port`` rendezvous, rank 0 listens)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group(
        backend,
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def block_classes(model: nn.Module) -> set[str]:
    """Class names FSDP shards one by one: HF's ``_no_split_modules`` (transformer blocks)."""
    names = getattr(model, "_no_split_modules", None) or []
    return set(names)


def shard_model(model: nn.Module, device: str | torch.device) -> nn.Module:
    """FSDP2 (``fully_shard``) each transformer block, then the root; move shards to
    ``device``. The model must be on CPU (full weights) and the group initialized.

    Parameters keep their dtype (load the model in bf16/fp16 for half precision): the
    sharded model then computes exactly what the unsharded one in that dtype does.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = block_classes(model)
    n = 0
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
            n += 1
    fully_shard(model, mesh=mesh)
    if device.type != "cpu":
        model.to(device)
    log.info("FSDP2: %d blocks + root sharded over %d ranks", n, dist.get_world_size())
    return model


def _agree_max(value: int, device: torch.device) -> int:
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def dummy_doc():
    """A 2-token document: the cheapest pass that runs every FSDP collective."""
    from ..data.tokenize import TokenizedDoc

    ids = np.zeros(2, dtype=np.int64)
    return TokenizedDoc(input_ids=ids, labels=ids.copy())


def make_lockstep(runner, comm_device: str | torch.device = "cpu"):
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


def build_sharded_runner(spec, device: str):
    """A GradientRunner whose model is FSDP-sharded over the (initialized) group.

    The model is loaded on CPU (each rank reads the full checkpoint into host memory
    once), sharded, and only the shards move to ``device``; everything after the
    engine (preprocessing, scoring) stays on CPU as in the unsharded path.
    """
    import dataclasses

    from .runner import GradientRunner

    runner = GradientRunner(dataclasses.replace(spec, device="cpu"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    shard_model(runner.engine.model, dev)
    runner.engine.device = dev
    make_lockstep(runner, dev if backend_for(str(dev)) == "nccl" else "cpu")
    return runner
