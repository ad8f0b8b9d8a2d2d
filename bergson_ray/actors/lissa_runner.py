"""One LiSSA worker's state and job, without Ray: model, training rows, query rows.

A job is one repeat of one query, ``(row, repeat)``: the series of ``depth`` Gauss-Newton
products on bergson's batches for that repeat (``hessians/lissa.py``). Its result, the
final ``h`` of the recursion, is written to ``<repeats>/q<row>_r<repeat>.safetensors``
through a temporary file and ``os.replace``, so a file that exists is complete: a resumed
run or a replacement worker redoes only repeats without a file. The driver combines a
query's repeats in repeat order, so the result does not depend on which worker ran what.

The model is loaded with eager attention (forward-mode AD has no rule for the fused
attention kernels) and only the tracked modules' weights require gradients. Training
rows are read and tokenized per batch, as the ``build`` workers read them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import BatchConfig, DataConfig, GradientConfig, ModelConfig
from ..errors import BadInputError
from ..hessians.lissa import LissaSettings

EAGER = "attn_implementation=eager"


def repeat_path(repeats_dir: str | Path, row: int, repeat: int) -> Path:
    """Where repeat ``repeat`` of query ``row`` is written."""
    return Path(repeats_dir) / f"q{row}_r{repeat}.safetensors"


def write_repeat(path: Path, blocks: Mapping[str, Tensor]) -> None:
    """Atomic safetensors write: a temporary sibling, then ``os.replace``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({n: v.detach().float().cpu().contiguous() for n, v in blocks.items()}, str(tmp))
    os.replace(tmp, path)


def read_repeat(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def eager_model(model: ModelConfig) -> ModelConfig:
    """``model`` loaded with eager attention unless ``--model_kwargs`` already picks one."""
    if "attn_implementation" in model.model_kwargs:
        return model
    kwargs = f"{model.model_kwargs},{EAGER}" if model.model_kwargs else EAGER
    return dataclasses.replace(model, model_kwargs=kwargs)


@dataclass(frozen=True)
class LissaSpec:
    """Everything a worker needs (small and picklable; sent once per actor)."""

    model: ModelConfig
    grad: GradientConfig
    data: DataConfig
    batch: BatchConfig
    query_path: str
    repeats_dir: str
    settings: LissaSettings
    seed: int = 0
    micro_batch_size: int = 16
    device: str = "cpu"
    torch_threads: int = 0


class LissaRunner:
    """Builds the Gauss-Newton product once; then runs repeat after repeat."""

    def __init__(self, spec: LissaSpec):
        from ..data.loading import DatasetRows
        from ..gradients.losses import scale_logits
        from ..gradients.modules import find_target_modules
        from ..hessians.gauss_newton import GaussNewtonProduct
        from ..runners.model_loading import load_model, max_model_length
        from ..store.gradient_store import GradientStore
        from ..utils.malloc import keep_freed_memory

        keep_freed_memory()  # no page faults on the tensors every product re-allocates
        if spec.torch_threads > 0:
            torch.set_num_threads(spec.torch_threads)
        device = spec.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.spec = spec
        self.device = torch.device(device)
        model, self.tokenizer = load_model(eager_model(spec.model), self.device)
        scale_logits(model, spec.grad.logit_scale)  # --logit_scale, as the gradient runner
        model.requires_grad_(False)
        modules = find_target_modules(model, spec.grad)
        self.hvp = GaussNewtonProduct(
            model, modules, include_bias=spec.grad.include_bias,
            loss_reduction=spec.grad.loss_reduction,
        )
        self.query = GradientStore.open(spec.query_path)
        sizes = self.query.grad_sizes
        if sizes != self.hvp.sizes:
            differ = sorted(set(sizes.items()) ^ set(self.hvp.sizes.items()))
            raise BadInputError(
                f"query store {spec.query_path} does not hold full gradients of this model's "
                f"modules (e.g. {differ[0][0]}): build it with --projection_dim 0 and the "
                "same --model, module filters and --include_bias"
            )
        self.columns = self.query.column_offsets
        self.source = DatasetRows(spec.data)
        self.num_docs = len(self.source)
        limit = max_model_length(model, self.tokenizer)
        if spec.data.truncation:
            budget = spec.batch.token_batch_size
            limit = min(limit, budget) if limit else budget
        self.max_length = limit

    # -- pieces ------------------------------------------------------------------------
    def query_blocks(self, row: int) -> dict[str, Tensor]:
        """Query ``row`` as float32 per-module blocks on the worker's device."""
        flat = self.query.rows([row])[0].float()
        return {n: flat[a:b].to(self.device) for n, (a, b) in self.columns.items()}

    def product(self, v: Mapping[str, Tensor], indices: list[int]) -> dict[str, Tensor]:
        """``G_B v`` on training documents ``indices``: a mean over all of them, computed
        ``micro_batch_size`` documents at a time (documents with < 2 tokens add nothing)."""
        import numpy as np

        from ..data.batching import collate
        from ..data.tokenize import tokenize_rows

        out = {n: torch.zeros_like(x) for n, x in v.items()}
        step = self.spec.micro_batch_size
        for lo in range(0, len(indices), step):
            chunk = np.asarray(indices[lo : lo + step], dtype=np.int64)
            docs = tokenize_rows(
                self.source.rows(chunk), self.tokenizer, self.spec.data, self.max_length,
                row_ids=chunk.tolist(),
            )
            docs = [d for d in docs if len(d.input_ids) >= 2]
            if not docs:
                continue
            batch = collate(docs).to(self.device)
            share = self.hvp.product(v, batch.input_ids, batch.labels, len(indices))
            for n in out:
                out[n] += share[n]
        return out

    # -- the worker's jobs ---------------------------------------------------------------
    def scale_check(self) -> float:
        """Largest eigenvalue estimate on one batch; raises when ``--scale`` is too small."""
        from ..hessians.lissa import check_scale

        return check_scale(
            self.product, self.query_blocks(0), self.num_docs, self.spec.settings,
            seed=self.spec.seed,
        )

    def compute(self, job: tuple[int, int]) -> dict[str, Tensor]:
        """Repeat ``repeat`` of query ``row``: the recursion's final ``h``."""
        from ..hessians.lissa import lissa_repeat, repeat_generator

        row, repeat = job
        s = self.spec.settings
        gen = repeat_generator(self.spec.seed, row, repeat, self.num_docs, s.depth)
        return lissa_repeat(
            self.product, self.query_blocks(row), self.num_docs, s, gen,
            label=f"query {row} repeat {repeat}",
        )

    def run(self, job: tuple[int, int]) -> tuple[int, int]:
        """Compute ``job`` and write it atomically; returns ``job``."""
        write_repeat(repeat_path(self.spec.repeats_dir, *job), self.compute(job))
        return job


__all__ = [
    "LissaRunner",
    "LissaSpec",
    "eager_model",
    "read_repeat",
    "repeat_path",
    "write_repeat",
]
