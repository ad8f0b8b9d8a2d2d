"""One config per command, made of the sections in ``sections.py``.

Each command config's ``__post_init__`` checks what involves two sections at once (the
sections check themselves), so every way of making a config (CLI flags, YAML, Python
keywords, ``dataclasses.replace``) is validated exactly once, before Ray starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .candidates import CandidateConfig
from .hessian import HessianConfig
from .sections import (
    QUANTIZED_PRECISIONS,
    BatchConfig,
    DataConfig,
    GradientConfig,
    IndexModelConfig,
    Inversion,
    ModelConfig,
    PreprocessConfig,
    RayConfig,
    RunConfig,
    ScoreConfig,
    require,
)


def check_model_options(model: ModelConfig, grad: GradientConfig, batch: BatchConfig, ray: RayConfig) -> None:
    """bergson's model options that need the worker settings too (build, score, hessian).

    ``--precision int4|int8`` needs a CUDA GPU: refused here, before Ray starts, when the
    workers are bound to run on CPU (``--worker_device cpu``, or a local Ray on a machine
    without a visible GPU). A cluster given by ``--address`` / ``RAY_ADDRESS`` may have GPU
    workers, so there the worker that loads the model says it instead.
    """
    if model.precision in QUANTIZED_PRECISIONS:
        what = f"--precision {model.precision}"
        require(not ray.fsdp, f"{what} cannot be combined with --fsdp: bitsandbytes weights are not sharded here")
        require(
            ray.worker_device != "cpu" and _gpu_workers_possible(ray),
            f"{what} loads a bitsandbytes-quantized model, which needs a CUDA GPU, and the "
            "workers would run on CPU; use --precision bf16 or fp16 there",
        )
    if getattr(model, "peft_init_kwargs", ""):
        require(
            not grad.moe_experts,
            "--moe_experts cannot be combined with a PEFT adapter: the adapter's modules are what is tracked",
        )
    require(
        not (batch.auto_batch_size and ray.fsdp),
        "--auto_batch_size does not search over an --fsdp group; set --token_batch_size",
    )


def index_model(model: ModelConfig) -> IndexModelConfig:
    """A plain :class:`ModelConfig` (e.g. from the Python API) as the commands' model
    section, so a config equals itself after a round trip through ``config.yaml``."""
    if isinstance(model, IndexModelConfig):
        return model
    return IndexModelConfig(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})


def _gpu_workers_possible(ray: RayConfig) -> bool:
    import os

    if ray.address or os.environ.get("RAY_ADDRESS"):
        return True
    import torch

    return torch.cuda.is_available()


@dataclass
class BuildConfig:
    """Everything ``bergson-ray build`` (and ``reduce``) needs."""

    run: RunConfig = field(default_factory=RunConfig)
    model: IndexModelConfig = field(default_factory=IndexModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grad: GradientConfig = field(default_factory=GradientConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    drop_columns: bool = False
    """Keep only length/loss in data.hf (bergson's default); we keep the text by default."""
    skip_short_docs: bool = False
    """Keep documents with < 2 tokens as zero rows (bergson's behaviour) instead of failing."""

    def __post_init__(self) -> None:
        require(
            not (self.grad.attribute_tokens and self.preprocess.aggregation != "none"),
            "--attribute_tokens needs --aggregation none",
        )
        self.model = index_model(self.model)
        check_model_options(self.model, self.grad, self.batch, self.ray)


TokenInfluence = Literal["gradient", "output"]

OUTPUT_INFLUENCE_LIMITS: tuple[tuple[str, str], ...] = (
    ("grad.projection_dim", "--projection_dim other than 0 (it needs the full query)"),
    ("preprocess.unit_normalize", "--unit_normalize (it needs dot-product scoring)"),
    ("grad.optimizer_state", "--optimizer_state"),
    ("grad.split_attention_modules", "--split_attention_modules"),
    ("grad.moe_experts", "--moe_experts"),
    ("ray.fsdp", "--fsdp"),
)
"""What ``--token_influence output`` cannot reproduce (bergson refuses the same)."""


@dataclass
class ScoreRunConfig(BuildConfig):
    """Everything ``bergson-ray score`` needs: a build's settings plus the query."""

    score: ScoreConfig = field(default_factory=ScoreConfig)
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    token_influence: TokenInfluence = "gradient"
    """What a score row is (bergson's): gradient = the gradient at position t (its effect
    on every later token's loss); output = the rate of change of the loss on token t+1
    alone along the query (Grosse et al. 2023), one forward-mode pass per query column.
    Rows sum to the per-document score either way; output needs --projection_dim 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.token_influence in ("gradient", "output"),
            f"unknown --token_influence {self.token_influence!r}; use gradient or output",
        )
        if self.token_influence == "output":
            bad = [what for path, what in OUTPUT_INFLUENCE_LIMITS if _set(self, path)]
            if self.model.precision in ("int4", "int8"):
                bad.append(f"--precision {self.model.precision}")
            require(not bad, f"--token_influence output does not support {', '.join(bad)}")
        self._check_candidates()

    def _check_candidates(self) -> None:
        cand = self.candidates
        if not cand.active:
            require(
                cand.top_k == 0 and cand.fraction == 0,
                "--candidates.top_k and --fraction choose rows of an earlier run: give it with --scores",
            )
            return
        if cand.top_k == 0 and self.score.top_k > 0:
            # bergson's --top_k is the candidate count; ours also names top_k.parquet's
            # size, so with --scores a bare --top_k is bergson's (top_k.parquet then
            # needs --candidates.top_k for the count; dataclasses.replace: never mutate
            # a section another config may share)
            self.candidates = cand = dataclasses.replace(cand, top_k=self.score.top_k)
            self.score = dataclasses.replace(self.score, top_k=0)
        if cand.from_record:
            require(
                cand.fraction == 0,
                "--fraction does not apply to a query --record CSV; keep rows with --top_k",
            )
        else:
            require(
                (cand.top_k > 0) != (cand.fraction > 0),
                "--scores needs exactly one of --top_k and --fraction (rows kept per query column)",
            )
        require(
            not self.grad.attribute_tokens,
            "--scores (candidate rescoring) does not support --attribute_tokens, as in bergson",
        )


@dataclass
class HessianRunConfig:
    """Everything ``bergson-ray hessian`` needs."""

    run: RunConfig = field(default_factory=RunConfig)
    model: IndexModelConfig = field(default_factory=IndexModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grad: GradientConfig = field(default_factory=GradientConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    hessian: HessianConfig = field(default_factory=HessianConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    skip_short_docs: bool = False
    """Keep documents with < 2 tokens (they contribute nothing) instead of failing."""

    def __post_init__(self) -> None:
        require(
            not self.run.resume,
            "hessian keeps its sums in memory and cannot --resume; rerun it",
        )
        self.hessian.check_against(self.grad)
        self.model = index_model(self.model)
        check_model_options(self.model, self.grad, self.batch, self.ray)


@dataclass
class EkfacRunConfig:
    """bergson's ``ekfac`` (HessianPipelineConfig) on Ray."""

    run: RunConfig = field(default_factory=RunConfig)
    model: IndexModelConfig = field(default_factory=IndexModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    query: DataConfig = field(default_factory=lambda: DataConfig(dataset=""))
    grad: GradientConfig = field(default_factory=GradientConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    hessian: HessianConfig = field(
        default_factory=lambda: HessianConfig(method="kfac", ev_correction=True)
    )
    query_aggregation: Literal["mean", "sum", "none"] = "mean"
    """How query gradients are combined (none keeps one score column per query)."""
    inversion: Inversion = "damped_inverse"
    """How the Hessian's eigenvalues are inverted for H^-1 q."""
    damping_factor: float = 0.1
    """Damping c in 1 / (lambda + c * mean(lambda))."""
    apply_batch_size: int = 32
    """Query rows preconditioned at once (bounds memory)."""
    query_batch_size: int | None = None
    """Queries per matrix product when scoring (bounds memory; data is still read once)."""
    ray: RayConfig = field(default_factory=RayConfig)
    skip_short_docs: bool = False
    """Keep documents with < 2 tokens as zero rows instead of failing."""

    def __post_init__(self) -> None:
        require(
            self.hessian.factored,
            "ekfac needs a factored --method (kfac, tkfac or shampoo)",
        )
        require(self.damping_factor >= 0, "--damping_factor must be >= 0")
        require(self.apply_batch_size >= 1, "--apply_batch_size must be >= 1")
        require(
            self.query_batch_size is None or self.query_batch_size >= 1,
            "--query_batch_size must be >= 1",
        )
        self.model = index_model(self.model)
        check_model_options(self.model, self.grad, self.batch, self.ray)


SECTION_HELP: dict[str, str] = {
    "run": "where the run is written",
    "model": "the model",
    "data": "the dataset",
    "query": "the query dataset (flags prefixed --query.)",
    "grad": "gradients and projections",
    "batch": "batching",
    "preprocess": "row preprocessing",
    "ray": "Ray cluster and workers",
    "hessian": "the Hessian fit",
    "lissa": "the LiSSA series (bergson's lissa_cfg)",
    "score": "scoring",
    "candidates": "rescore only the rows an earlier run ranked best (bergson's score_cfg.candidates)",
    "faiss": "the FAISS index",
    "training": "how the model is trained (bergson's trainer options)",
    "probe": "the metasmoothness finite-difference probe",
    "lds": "--method lds: leave-k-out subsets",
    "filter": "--method filter: remove the top proponents or detractors",
    "weight_step": "--method weight_step: retrain with weights 1 - lr * score",
}
"""Argument-group titles of the sections in ``--help``."""


def _set(cfg: object, dotted: str) -> bool:
    """Whether the option at ``dotted`` (``"grad.projection_dim"``) is set (truthy);
    options another build may lack count as unset."""
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return bool(obj)
