"""Configuration dataclasses shared by every command.

Field names and defaults follow bergson's (see ``bergson-spec.md`` §1.3) so that a
bergson command line translates to ours flag for flag. Settings that only exist
because we run on Ray live in :class:`RayConfig`.

The classes are plain dataclasses: the CLI builds argparse options from them
(``bergson_ray.cli.args``) and ``config.yaml`` in every run directory is
``dataclasses.asdict`` of the command's config, so a run can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Precision = Literal["auto", "fp32", "bf16", "fp16", "fp64"]

TINY = "tiny"
"""Model/dataset name of the embedded tiny default (built locally, never downloaded)."""


@dataclass
class DataConfig:
    """Which dataset to read and how to turn its rows into token sequences."""

    dataset: str = TINY
    """Hub id, ``save_to_disk`` dir, ``.parquet``/``.jsonl``/``.json``/``.csv`` file or glob,
    or ``tiny`` (the embedded pydoc corpus)."""
    split: str = "train"
    subset: str | None = None
    prompt_column: str = "text"
    completion_column: str = ""
    """If set, rows are rendered as user/assistant chat and only completion tokens carry loss."""
    conversation_column: str = ""
    """Column holding a list of ``{"role", "content"}`` messages; loss on assistant turns only."""
    reward_column: str = ""
    """Enables the Dr. GRPO advantage-weighted loss (advantage = reward - prompt-group mean)."""
    skip_nan_rewards: bool = False
    truncation: bool = False
    """Truncate to ``min(model max length, token_batch_size)`` instead of rejecting long docs."""
    data_kwargs: str = ""
    """Extra ``k=v,k2=v2`` keyword arguments for ``datasets.load_dataset``."""


@dataclass
class AttentionConfig:
    """How to split an attention projection's output dimension into per-head blocks."""

    num_heads: int = 0
    head_size: int = 0
    head_dim: int = 2
    """Axis of the ``[N, S, O]`` output-gradient tensor that holds the heads (only 2 is supported)."""


@dataclass
class GradientConfig:
    """How per-example gradients are computed and compressed (bergson's IndexConfig, minus I/O)."""

    projection_dim: int = 0
    """Per-module projection size p (0 = store full gradients)."""
    projection_type: Literal["rademacher", "normal"] = "rademacher"
    projection_scale: Literal["jl", "row_norm"] = "jl"
    projection_target: Literal["per_module", "global"] = "per_module"
    projection_seed: int | None = None
    """Seed of the random projections: appended to every matrix identifier as
    ``/seed<n>`` (bergson's ``projection_seed``). None = no suffix."""
    projection_version: int = 2
    """Projection-matrix generator. 2 = bergson >= 2.5 (Philox4x32-10, identical on every
    device); 1 = older bergson (md5 -> PCG64 bits / ``torch.randn``, bergson-spec §3.3).
    Stores of different versions cannot be scored against each other."""
    include_bias: bool = False
    loss_fn: Literal["ce", "kl"] = "ce"
    loss_reduction: Literal["sum", "mean"] = "sum"
    label_smoothing: float = 0.0
    filter_modules: str | None = None
    """Comma-separated fnmatch globs of module names to EXCLUDE."""
    modules: list[str] = field(default_factory=list)
    """Comma-separated fnmatch globs of module names to INCLUDE (empty = all supported)."""
    split_attention_modules: list[str] = field(default_factory=list)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    attribute_tokens: bool = False
    optimizer_state: str = ""
    """``optimizer.pt`` / ``.safetensors`` file or a dir holding one -> Adam/Adafactor normalizers."""


@dataclass
class ModelConfig:
    model: str = TINY
    tokenizer: str = ""
    revision: str | None = None
    precision: Precision = "fp32"
    model_kwargs: str = ""


@dataclass
class BatchConfig:
    token_batch_size: int = 2048
    """Padded-token budget per forward/backward pass (max_len x n_docs <= budget)."""
    max_batch_size: int | None = None
    """Cap on documents per pass."""


@dataclass
class RayConfig:
    """Where and how wide to run on Ray."""

    address: str | None = None
    """Ray cluster address; None uses ``RAY_ADDRESS`` or starts a local Ray."""
    num_workers: int = 0
    """Gradient worker actors. 0 = one per GPU, or 1 on a CPU-only cluster."""
    num_gpus_per_worker: float = 1.0
    """GPUs per worker when GPUs exist (> 1 together with ``fsdp`` shards a large model)."""
    cpus_per_worker: float = 0.5
    """Logical CPUs each worker reserves. Below 1 so Ray Data's read tasks always get a slot."""
    torch_threads: int = 0
    """Intra-op threads per CPU worker; 0 = physical CPUs of the node / workers on it."""
    window_size: int = 64
    """Documents per Ray Data batch handed to a worker (packed further by token budget)."""
    fsdp: bool = False
    """Shard the model over a group of actors (torch.distributed FSDP2): one actor per GPU,
    ``num_gpus_per_worker`` of them per worker (NCCL); on CPU clusters 2 gloo actors."""
    fsdp_shards: int = 0
    """Actors per sharded worker with ``fsdp``; 0 = ``num_gpus_per_worker`` (GPU) or 2 (CPU)."""
    worker_device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: GPU workers if the cluster has GPUs now or its autoscaler can add GPU nodes."""
    worker_resources: str = ""
    """Custom Ray resources each worker requires, ``name=amount,...`` (pins workers to the
    node types that advertise them, e.g. ``ray start --resources='{"grad": 1}'``)."""
    worker_labels: str = ""
    """Node labels workers must run on, ``key=value,...`` (Ray label selector)."""
    namespace: str = "bergson_ray"


@dataclass
class RunConfig:
    run_path: str = ""
    overwrite: bool = False
    resume: bool = False
    """Continue an interrupted run in ``<run_path>.part``, skipping rows already written."""


@dataclass
class PreprocessConfig:
    """What happens to each gradient row after collection (bergson's PreprocessConfig)."""

    unit_normalize: bool = False
    hessian_path: str | None = None
    ev_correction: bool = False
    inversion: Literal[
        "damped_inverse", "tikhonov_filtered", "pseudoinverse", "factored_tikhonov"
    ] = "damped_inverse"
    damping_factor: float = 0.1
    aggregation: Literal["none", "mean", "sum"] = "none"
    normalize_aggregated_grad: bool = False


@dataclass
class BuildConfig:
    """Everything ``bergson-ray build`` (and ``reduce``) needs."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grad: GradientConfig = field(default_factory=GradientConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    drop_columns: bool = False
    """Keep only ``length``/``loss`` in ``data.hf``. bergson defaults to True; we keep the
    text by default so a store is self-contained for the query service."""
    skip_short_docs: bool = False
    """Keep documents with < 2 tokens as zero rows (bergson's behaviour) instead of failing."""


@dataclass
class ScoreConfig:
    """bergson's ScoreConfig. ``--modules`` (GradientConfig) doubles as the scored subset."""

    query_path: str = ""
    score: Literal["individual", "nearest", "mean", "max"] = "individual"
    """individual: one column per query; nearest/max: best query; mean: the mean query."""
    query_batch_size: int | None = None
    """Queries per GEMM inside a worker (bounds memory); the data is still read once."""
    score_precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """dtype of ``scores.bin``."""
    higher_is_better: bool = True
    top_k: int = 0
    """If > 0, also write ``top_k.parquet`` with the k best rows per query and their text."""
    bottom_k: int = 0


@dataclass
class ScoreRunConfig(BuildConfig):
    """Everything ``bergson-ray score`` needs: a build's settings plus the query."""

    score: ScoreConfig = field(default_factory=ScoreConfig)
