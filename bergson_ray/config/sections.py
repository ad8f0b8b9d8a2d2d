"""The sections every command's config is made of (data, model, gradients, batching, Ray).

Field names and defaults follow bergson's (``bergson-spec.md`` §1.3, and bergson 2.5.1's
``--help``) so that a bergson command line translates to ours flag for flag. Settings
that only exist because we run on Ray live in :class:`RayConfig`.

The string literal under each field is its ``--help`` line (read by ``config/docs.py``);
``__post_init__`` rejects values no command could use, with one sentence naming the flag.
Checks that need two sections at once live on the command configs (``commands.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..errors import BadInputError

Precision = Literal["auto", "fp32", "bf16", "fp16", "fp64"]
IndexPrecision = Literal["auto", "fp32", "bf16", "fp16", "fp64", "int4", "int8"]
QUANTIZED_PRECISIONS = ("int4", "int8")
"""bitsandbytes precisions (GPU only): 4-bit NF4 and 8-bit weights, bf16 elsewhere."""

TINY = "tiny"
"""Model/dataset name of the embedded tiny default (built locally, never downloaded)."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`BadInputError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise BadInputError(message)


@dataclass
class DataConfig:
    """Which dataset to read and how to turn its rows into token sequences."""

    dataset: str = TINY
    """Hub id, save_to_disk dir, .parquet/.jsonl/.json/.csv file or glob, or 'tiny'."""
    split: str = "train"
    """Dataset split to read (slicing like 'train[:1000]' works)."""
    subset: str | None = None
    """Dataset configuration (subset) name passed to datasets.load_dataset."""
    prompt_column: str = "text"
    """Column holding the text (or the prompt when a completion column is set)."""
    completion_column: str = ""
    """Column holding completions: rows become user/assistant chat, loss on the completion only."""
    conversation_column: str = ""
    """Column holding a list of {role, content} messages; loss on assistant turns only."""
    reward_column: str = ""
    """Column of rewards: enables the Dr. GRPO advantage-weighted loss."""
    advantage_column: str = ""
    """Column of precomputed per-row advantages (e.g. logged by a GRPO trainer): the same loss as --reward_column, weights taken as given."""
    skip_nan_rewards: bool = False
    """Drop rows whose reward is NaN instead of failing."""
    truncation: bool = False
    """Truncate documents to min(model max length, token_batch_size) instead of rejecting them."""
    data_kwargs: str = ""
    """Extra keyword arguments for datasets.load_dataset, as k=v,k2=v2."""
    format_template: str = ""
    """YAML file (or 'mcqa') of Jinja2 doc_to_text / doc_to_target / doc_to_choice templates that write each row; with doc_to_target only the target carries loss."""
    chunk_length: int = 0
    """When > 0, join the documents with EOS and cut the stream into rows of this many tokens (doc_ids in data.hf map them back)."""
    max_tokens: int | None = None
    """Process about this many tokens: a prefix of the rows, or the rows repeated when the dataset is smaller (bergson's experimental benchmarking cap)."""

    def __post_init__(self) -> None:
        require(isinstance(self.prompt_column, str), "--prompt_column must be a column name")
        require(
            not (self.reward_column and self.advantage_column),
            "set --reward_column or --advantage_column, not both",
        )
        require(
            self.chunk_length == 0 or self.chunk_length >= 2,
            "--chunk_length must be 0 (off) or at least 2 tokens",
        )
        require(
            self.max_tokens is None or self.max_tokens >= 1, "--max_tokens must be >= 1"
        )
        if self.chunk_length:
            require(not self.truncation, "--chunk_length and --truncation cannot both be set: chunks are already cut to length")
            require(not self.format_template, "--chunk_length and --format_template cannot both be set: chunks are cut from plain text")
            require(
                not (self.completion_column or self.conversation_column),
                "--chunk_length chunks the plain text of --prompt_column; drop --completion_column/--conversation_column",
            )
            require(
                not (self.reward_column or self.advantage_column),
                "--chunk_length rows are pieces of a token stream, not rollouts: drop --reward_column/--advantage_column",
            )
            require(
                self.max_tokens is None,
                "--max_tokens does not apply to --chunk_length runs (bergson ignores it there); slice --split instead",
            )
        if self.format_template:
            require(
                not (self.completion_column or self.conversation_column),
                "--format_template writes the prompt and completion itself; drop --completion_column/--conversation_column",
            )
            require(
                not self.reward_column,
                "--reward_column groups rollouts by a prompt column, which --format_template replaces; pass --advantage_column instead",
            )


@dataclass
class AttentionConfig:
    """How to split an attention projection's output dimension into per-head blocks."""

    num_heads: int = 0
    """Heads to split --split_attention_modules into (0 = read from the model config)."""
    head_size: int = 0
    """Size of one head's block of the output dimension (0 = hidden size / heads)."""
    head_dim: int = 2
    """Axis of the [N, S, O] output gradient that holds the heads (only 2 is supported)."""

    def __post_init__(self) -> None:
        require(self.num_heads >= 0, "--attention.num_heads must be >= 0")
        require(self.head_size >= 0, "--attention.head_size must be >= 0")


@dataclass
class GradientConfig:
    """How per-example gradients are computed and compressed (bergson's IndexConfig, minus I/O)."""

    projection_dim: int = 0
    """Per-module random projection size p; each module's block is p x p (0 = full gradients)."""
    projection_type: Literal["rademacher", "normal"] = "rademacher"
    """Entries of the random projection matrices."""
    projection_scale: Literal["jl", "row_norm"] = "jl"
    """Scaling of the projections: Johnson-Lindenstrauss (1/sqrt(p)) or unit row norms."""
    projection_target: Literal["per_module", "global"] = "per_module"
    """Project each module separately (two-sided) or the whole flattened gradient at once."""
    projection_seed: int | None = None
    """Seed appended to every projection matrix identifier as /seed<n> (None = no suffix)."""
    projection_version: int = 2
    """Projection generator: 2 = bergson >= 2.5 (Philox), 1 = older bergson (PCG64)."""
    include_bias: bool = False
    """Also attribute to the bias of every tracked module (one extra input column)."""
    loss_fn: Literal["ce", "log_odds"] = "ce"
    """Per-document loss whose gradient is taken: cross-entropy, or log_odds (the negative label log-odds, TRAK's)."""
    loss_reduction: Literal["sum", "mean"] = "sum"
    """Sum or average a document's token losses."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss."""
    logit_scale: float = 1.0
    """Multiply the model's output logits by this factor before the loss (bergson's experimental option)."""
    filter_modules: str | None = None
    """Comma-separated fnmatch globs of module names to exclude."""
    modules: list[str] = field(default_factory=list)
    """Comma-separated fnmatch globs of module names to include (empty = every Linear)."""
    split_attention_modules: list[str] = field(default_factory=list)
    """Modules (globs) whose output dimension is split into per-head blocks."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    attribute_tokens: bool = False
    """Write one row per token instead of one per document."""
    optimizer_state: str = ""
    """optimizer.pt / .safetensors file (or a dir holding one): Adam/Adafactor normalizers."""
    moe_experts: str = ""
    """Comma-separated globs naming MoE experts modules with fused 3-D expert weights (e.g. 'model.layers.*.mlp.experts'): track each expert's projections as modules."""
    reshape_to_square: bool = False
    """Recorded in processor_config.yaml as bergson does; bergson 2.5.1 never applies it (its collector does not reshape), so rows are unchanged."""

    def __post_init__(self) -> None:
        require(self.projection_dim >= 0, "--projection_dim must be >= 0")
        require(
            not (self.moe_experts and self.optimizer_state),
            "--optimizer_state has no per-expert moments for --moe_experts; drop one of them",
        )
        require(self.projection_version in (1, 2), "--projection_version must be 1 or 2")
        require(0.0 <= self.label_smoothing < 1.0, "--label_smoothing must be in [0, 1)")
        require(
            math.isfinite(self.logit_scale) and self.logit_scale != 0,
            "--logit_scale must be a finite, nonzero number",
        )


@dataclass
class ModelConfig:
    """Which model to load and how."""

    model: str = TINY
    """Hub id or local directory of a causal LM, or 'tiny' (the embedded default)."""
    tokenizer: str = ""
    """Tokenizer to use when it is not the model's own (hub id or directory)."""
    revision: str | None = None
    """Model revision (branch, tag or commit) on the hub."""
    precision: Precision = "fp32"
    """dtype of the model weights (auto = the checkpoint's own)."""
    model_kwargs: str = ""
    """Extra keyword arguments for from_pretrained, as k=v,k2=v2."""
    force_math_sdp: bool = False
    """Disable the flash and memory-efficient SDPA kernels (CPU and GPU) so attention uses the math kernel; run test_model_configuration to see whether a model needs it."""
    use_tf32_matmuls: bool = False
    """Allow TF32 for float32 matmuls on GPU (torch matmul precision 'high'): most of fp32's accuracy at a fraction of its cost."""


@dataclass
class IndexModelConfig(ModelConfig):
    """Which model to load and how (build, score, reduce, hessian: bergson's IndexConfig
    adds quantized precisions and PEFT adapters; --model may be an adapter directory)."""

    precision: IndexPrecision = "fp32"
    """dtype of the model weights (auto = the checkpoint's own; int4/int8 = bitsandbytes-quantized, CUDA only)."""
    peft_init_kwargs: str = ""
    """Wrap the model in a new PEFT adapter made from these peft config arguments, k=v,k2=v2 (a|b is a list, LoRA unless peft_type=...); only the adapter's modules are tracked."""

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.peft_init_kwargs:
            from ..utils.kv import parse_kv

            parse_kv(self.peft_init_kwargs, "--peft_init_kwargs")  # bad syntax: one sentence now


@dataclass
class BatchConfig:
    """How documents are packed into forward/backward passes."""

    token_batch_size: int = 2048
    """Padded-token budget per pass (longest x documents <= budget); a longer document runs alone, whole, unless --truncation."""
    max_batch_size: int | None = None
    """Most documents in one pass (None = only the token budget limits it)."""
    auto_batch_size: bool = False
    """On a GPU, each worker replaces --token_batch_size by the largest budget whose heaviest batches fit in its memory (bergson's search); on CPU it keeps --token_batch_size."""

    def __post_init__(self) -> None:
        require(self.token_batch_size > 1, "--token_batch_size must be > 1")
        require(
            self.max_batch_size is None or self.max_batch_size >= 1,
            "--max_batch_size must be >= 1",
        )


@dataclass
class RayConfig:
    """Where and how wide to run on Ray."""

    address: str | None = None
    """Ray cluster address; unset uses RAY_ADDRESS or starts a local Ray."""
    executor: Literal["auto", "ray", "process"] = "auto"
    """Where the workers compute: process = one worker in this process, no Ray; ray = a Ray actor pool; auto = process when the run would start its own local Ray for one worker, else ray."""
    num_workers: int = 0
    """Gradient worker actors (0 = one per GPU, or 1 on a CPU-only cluster)."""
    num_gpus_per_worker: float = 1.0
    """GPUs per worker when GPUs exist (> 1 together with --fsdp shards a large model)."""
    cpus_per_worker: float = 0.5
    """Logical CPUs each worker reserves (below 1 so Ray Data's read tasks always get a slot)."""
    torch_threads: int = 0
    """Intra-op threads per CPU worker (0 = the node's CPUs / workers on it)."""
    window_size: int = 64
    """Documents per Ray Data batch handed to a worker (packed further by token budget)."""
    fsdp: bool = False
    """Shard the model over a group of actors with FSDP2 (one per GPU; 2 gloo ranks on CPU)."""
    fsdp_shards: int = 0
    """Actors per sharded worker with --fsdp (0 = --num_gpus_per_worker on GPU, 2 on CPU)."""
    worker_device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: GPU workers if the cluster has GPUs now or its autoscaler can add GPU nodes."""
    worker_resources: str = ""
    """Custom Ray resources each worker requires, name=amount,... (pins workers to node types)."""
    worker_labels: str = ""
    """Node labels workers must run on, key=value,... (Ray label selector)."""
    namespace: str = "bergson_ray"
    """Ray namespace of the run's named actors."""

    def __post_init__(self) -> None:
        require(self.num_workers >= 0, "--num_workers must be >= 0 (0 = one per GPU)")
        require(self.num_gpus_per_worker >= 0, "--num_gpus_per_worker must be >= 0")
        require(self.cpus_per_worker > 0, "--cpus_per_worker must be > 0")
        require(self.torch_threads >= 0, "--torch_threads must be >= 0")
        require(self.window_size >= 1, "--window_size must be >= 1")
        require(self.fsdp_shards >= 0, "--fsdp_shards must be >= 0")
        if self.executor == "process":
            require(self.num_workers <= 1, "--executor process runs one worker; drop --num_workers or use --executor ray")
            require(not self.fsdp, "--executor process cannot shard with --fsdp; use --executor ray")
            require(not self.address, "--executor process runs without Ray; drop --address or use --executor ray")


@dataclass
class RunConfig:
    """Where a run is written and what to do with an existing one."""

    run_path: str = ""
    """Output directory (written as RUN_PATH.part and renamed when complete)."""
    overwrite: bool = False
    """Replace an existing run at the same path."""
    resume: bool = False
    """Continue an interrupted run in RUN_PATH.part, computing only what is missing."""


Inversion = Literal["damped_inverse", "tikhonov_filtered", "pseudoinverse", "factored_tikhonov"]


@dataclass
class PreprocessConfig:
    """What happens to each gradient row after collection (bergson's PreprocessConfig)."""

    unit_normalize: bool = False
    """Scale every row to unit norm (cosine similarity when scoring)."""
    hessian_path: str | None = None
    """Run dir of a hessian fit whose inverse preconditions the rows."""
    ev_correction: bool = False
    """Use the EK-FAC eigenvalues of --hessian_path (written by --ev_correction fits)."""
    inversion: Inversion = "damped_inverse"
    """How the Hessian's eigenvalues are inverted."""
    damping_factor: float = 0.1
    """Damping c in 1 / (lambda + c * mean(lambda))."""
    aggregation: Literal["none", "mean", "sum"] = "none"
    """Combine all rows into one (mean or sum) instead of one row per document."""
    normalize_aggregated_grad: bool = False
    """Unit-normalize the aggregated row."""
    apply_batch_size: int = 2
    """bergson's inversion_cfg.apply_batch_size; build and score precondition each batch of rows as it is made, so (as in bergson) it changes nothing here."""

    def __post_init__(self) -> None:
        require(self.damping_factor >= 0, "--damping_factor must be >= 0")
        require(self.apply_batch_size >= 1, "--apply_batch_size must be >= 1")


@dataclass
class ScoreConfig:
    """bergson's ScoreConfig. ``--modules`` (GradientConfig) doubles as the scored subset."""

    query_path: str = ""
    """Query store written by build or reduce (its rows are the queries)."""
    score: Literal["individual", "nearest", "mean", "max"] = "individual"
    """individual: one column per query; nearest/max: best query; mean: the mean query."""
    query_batch_size: int | None = None
    """Queries per matrix product inside a worker (bounds memory; data is still read once)."""
    score_precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """dtype of scores.bin."""
    higher_is_better: bool = True
    """Whether a larger score means a stronger proponent (recorded for readers)."""
    top_k: int = 0
    """Also write top_k.parquet with the k best rows per query and their text (0 = off).
    In ``score --scores`` it is bergson's candidate count instead (--candidates.top_k)."""
    bottom_k: int = 0
    """Also write the k worst rows per query into top_k.parquet (0 = off)."""

    def __post_init__(self) -> None:
        require(
            self.query_batch_size is None or self.query_batch_size >= 1,
            "--query_batch_size must be >= 1",
        )
        require(self.top_k >= 0, "--top_k must be >= 0")
        require(self.bottom_k >= 0, "--bottom_k must be >= 0")
