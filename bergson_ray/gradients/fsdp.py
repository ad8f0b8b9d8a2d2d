"""Per-example gradients from a model sharded with FSDP2 (pure torch, no Ray).

A model too big for one device is split over a ``torch.distributed`` group: every
rank holds ``1/world`` of each parameter and all-gathers a block's weights just for
that block's forward (and again for its backward). Activations are never sharded,
so the module taps of :class:`~bergson_ray.gradients.engine.GradientEngine` see the
same ``a [N,S,I]`` and ``g [N,S,O]`` as on one device and the per-example rows are
the same numbers (only float summation order may differ).

Here: the process group and the sharding. Keeping the ranks in lockstep over their
own documents (a worker's job) is ``runners/fsdp.py``.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


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
