"""Stage helpers shared by the build, reduce, score and Hessian pipelines.

Planning (driver, before any worker starts):

* :func:`meta_model` / :func:`plan_layout` learn the store layout (module row widths,
  dtype) from the model *config* on the meta device, so the driver never loads weights.
* :func:`open_dataset` opens and checks the source dataset (plus GRPO advantages);
  :func:`token_offsets` counts tokens for per-token stores; :func:`runner_spec` is what
  every worker needs to rebuild the runner.

Running the workers is ``workers.py``.

Writing (driver): :class:`Progress` (per-document loss and length, survives
``--resume``) and :func:`write_data_hf`; gradient rows are written by the workers
(``store/row_sink.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import BuildConfig, GradientConfig, ModelConfig
from ..data.row_plan import RowPlan
from ..errors import BadInputError, load_error
from ..runners.gradient_runner import RunnerSpec
from ..utils.dtypes import torch_dtype

log = logging.getLogger(__name__)

PROGRESS_DIR = "progress"


@dataclass
class Layout:
    grad_sizes: dict[str, int]
    dtype: torch.dtype

    @property
    def dim(self) -> int:
        return sum(self.grad_sizes.values())


def model_config(model_cfg: ModelConfig):
    """The model's HF config (no weights), or a clear error."""
    from transformers import AutoConfig

    from ..runners.model_loading import resolve_model_name

    name = resolve_model_name(model_cfg.model)
    try:
        return AutoConfig.from_pretrained(name, revision=model_cfg.revision)
    except Exception as err:  # noqa: BLE001 - transformers raises many types
        raise load_error("model", model_cfg.model, err) from None


def meta_model(model_cfg: ModelConfig, hf_cfg=None):
    """The model skeleton on the meta device: module names and shapes, no weights."""
    from transformers import AutoModelForCausalLM

    from ..runners.model_loading import with_adapter

    hf_cfg = hf_cfg if hf_cfg is not None else model_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    return with_adapter(model, model_cfg, meta=True)  # PEFT: the adapter's modules


def plan_layout(model_cfg: ModelConfig, grad_cfg: GradientConfig) -> Layout:
    """Row layout of a store built with these settings, from the model config alone."""
    from ..gradients.collector import PerExampleCollector
    from ..gradients.modules import find_target_modules, log_coverage

    hf_cfg = model_config(model_cfg)
    model = meta_model(model_cfg, hf_cfg)
    modules = find_target_modules(model, grad_cfg)
    log_coverage(model, modules, grad_cfg.include_bias)
    sizes = PerExampleCollector(modules, grad_cfg).grad_sizes
    if model_cfg.precision == "auto":
        dtype = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None)
        dtype = getattr(torch, str(dtype).replace("torch.", "")) if dtype else torch.float32
    else:
        dtype = torch_dtype(model_cfg.precision, "precision")
    return Layout(sizes, dtype)


# ----------------------------------------------------------------- dataset side
def validate_build(cfg: BuildConfig) -> None:
    """The checks ``build`` and ``reduce`` share."""
    if not cfg.run.run_path:
        raise BadInputError("run_path is required")
    if cfg.grad.attribute_tokens and cfg.preprocess.aggregation != "none":
        raise BadInputError("attribute_tokens needs aggregation 'none'")
    if cfg.grad.projection_dim < 0:
        raise BadInputError("projection_dim must be >= 0")
    if cfg.batch.token_batch_size <= 1:
        raise BadInputError("token_batch_size must be > 1")


def runner_spec(
    cfg: BuildConfig, device: str, advantages: np.ndarray | None, rows: RowPlan | None = None
) -> RunnerSpec:
    return RunnerSpec(
        model=cfg.model,
        grad=cfg.grad,
        data=cfg.data,
        batch=cfg.batch,
        preprocess=cfg.preprocess,
        skip_short_docs=cfg.skip_short_docs,
        device=device,
        advantages=advantages,
        rows=rows,
    )


def with_default_query(cfg, query_path: str | None = ""):
    """``cfg`` (a multi-step command's config with ``data`` and ``query`` sections) with
    the tiny query set as its query when it trains on the tiny corpus and names none.

    ``query_path`` is the command's ``--query_path`` (an existing query store also names
    a query); None for a command without one. Any other corpus needs its own query set.
    """
    if cfg.query.dataset or query_path:
        return cfg
    if cfg.data.dataset != "tiny":
        also = "" if query_path is None else " (or --query_path, an existing query store)"
        raise BadInputError(f"--query.dataset is required{also}")
    from ..defaults.tiny import ensure_tiny_assets

    query = dataclasses.replace(cfg.query, dataset=str(ensure_tiny_assets().query_dir))
    return dataclasses.replace(cfg, query=query)


def count_rows(data, what: str) -> int:
    """Rows of a dataset (``data``: a DataConfig); an empty or unreadable one fails here,
    before any work, with one sentence naming it."""
    from ..data.loading import check_columns, load_dataset_rows

    ds = load_dataset_rows(data)
    check_columns(ds.column_names, data)
    if len(ds) == 0:
        raise BadInputError(
            f"the {what} {data.dataset!r} (split {data.split!r}) has no rows; the command "
            f"needs at least one {what.split()[0]} document"
        )
    return len(ds)


def open_dataset(cfg: BuildConfig):
    """The source dataset (memory-mapped), validated, plus GRPO advantages if asked for."""
    from ..data.loading import check_columns, load_dataset_rows, prompt_key
    from ..data.tokenize import estimate_advantages

    ds = load_dataset_rows(cfg.data, planned=True)  # the caller applies plan_rows
    check_columns(ds.column_names, cfg.data)
    if len(ds) == 0:
        raise BadInputError(f"dataset {cfg.data.dataset!r} (split {cfg.data.split!r}) is empty")
    advantages = None
    if cfg.data.advantage_column:  # precomputed: weights the loss like reward-derived ones
        from ..data.loading import column_advantages

        advantages = column_advantages(ds, cfg.data)
    if cfg.data.reward_column:
        conv = bool(cfg.data.conversation_column)
        col = cfg.data.conversation_column or cfg.data.prompt_column
        prompts = [prompt_key(v, conv) for v in ds[col]]
        advantages = estimate_advantages(
            prompts, list(ds[cfg.data.reward_column]), cfg.data.skip_nan_rewards
        ).astype(np.float32)
        if np.isnan(advantages).any():
            raise BadInputError(
                f"{int(np.isnan(advantages).sum())} rows have NaN rewards: drop them from the "
                "dataset first (bergson_ray keeps row indices stable, so it does not drop rows)"
            )
    return ds, advantages


def driver_tokenizer(cfg) -> tuple[object, int | None]:
    """``(tokenizer, max_length)`` as the workers will have them, without the weights:
    ``max_length`` is the model's context (and the token budget with --truncation)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from ..runners.model_loading import max_model_length, resolve_model_name

    name = resolve_model_name(cfg.model.tokenizer or cfg.model.model)
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=cfg.model.revision)
    except Exception as err:  # noqa: BLE001 - transformers raises many types
        raise load_error("tokenizer", name, err) from None
    limit = max_model_length(SimpleNamespace(config=model_config(cfg.model)), tok)
    if cfg.data.truncation:
        budget = cfg.batch.token_batch_size
        limit = min(limit, budget) if limit else budget
    return tok, limit


def plan_rows(cfg, ds) -> RowPlan | None:
    """``--chunk_length`` / ``--max_tokens``: how store rows map onto ``ds`` (None: one to
    one). Tokenizes the dataset once on the driver; see ``data/row_plan.py``."""
    from ..data.row_plan import plan_rows as make_plan

    if not (cfg.data.chunk_length or cfg.data.max_tokens is not None):
        return None
    tok, limit = driver_tokenizer(cfg)
    return make_plan(ds, cfg.data, tok, limit)


def token_offsets(cfg: BuildConfig, ds, rows: RowPlan | None = None) -> np.ndarray:
    """Per-token stores need every document's token count before any row is written."""
    from transformers import AutoConfig, AutoTokenizer

    from ..data.tokenize import tokenize_rows
    from ..runners.model_loading import resolve_model_name

    if rows is not None and rows.chunks is not None:  # every chunk: L - 1 positions
        per = rows.chunks.chunk_length - 1
        return (np.arange(len(rows) + 1, dtype=np.int64) * per).astype(np.int64)

    name = resolve_model_name(cfg.model.tokenizer or cfg.model.model)
    tok = AutoTokenizer.from_pretrained(name, revision=cfg.model.revision)
    hf_cfg = AutoConfig.from_pretrained(resolve_model_name(cfg.model.model))
    limit = getattr(hf_cfg, "max_position_embeddings", None)
    if cfg.data.truncation:
        limit = min(limit or cfg.batch.token_batch_size, cfg.batch.token_batch_size)
    counts = np.zeros(len(ds), dtype=np.int64)
    step = 2048
    for lo in range(0, len(ds), step):
        docs = tokenize_rows(ds[lo : lo + step], tok, cfg.data, limit)
        counts[lo : lo + len(docs)] = [max(len(d.input_ids) - 1, 0) for d in docs]
    if rows is not None:  # --max_tokens: the store's rows, repeats included
        counts = counts[rows.source]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


class Progress:
    """Per-document loss and length, memory-mapped in the ``.part`` dir (survives resume)."""

    def __init__(self, part: Path, n: int):
        d = part / PROGRESS_DIR
        d.mkdir(exist_ok=True)
        mode = "r+" if (d / "loss.npy").exists() else "w+"
        self.loss = np.lib.format.open_memmap(d / "loss.npy", mode, np.float32, (n,))
        self.length = np.lib.format.open_memmap(d / "length.npy", mode, np.int64, (n,))

    def update(self, out: dict[str, np.ndarray]) -> None:
        self.loss[out["idx"]] = out["loss"]
        self.length[out["idx"]] = out["length"]

    def flush(self) -> None:
        self.loss.flush()
        self.length.flush()


def write_data_hf(
    part: Path, ds, progress: Progress, drop_columns: bool, rows: RowPlan | None = None
) -> None:
    """``data.hf``: the dataset's rows (unless dropped) plus ``length`` and ``loss``.

    With a row plan: ``--max_tokens`` rows are the dataset's rows in store order;
    ``--chunk_length`` rows are chunks, written as bergson does (``doc_ids``, ``length``,
    ``loss``; ``doc_ids[k][t]`` is the dataset row token ``t`` of chunk ``k`` came from).
    """
    import datasets

    if rows is not None and rows.chunks is not None:
        from ..data.row_plan import chunk_table

        chunk_table(rows.chunks, progress.length[:], progress.loss[:]).save_to_disk(
            str(part / "data.hf")
        )
        return
    if rows is not None:
        ds = rows.view(ds)
    if drop_columns:
        out = datasets.Dataset.from_dict({"length": progress.length[:], "loss": progress.loss[:]})
    else:
        out = ds
        for col in ("length", "loss"):
            if col in out.column_names:
                out = out.remove_columns(col)
        out = out.add_column("length", np.asarray(progress.length)).add_column(
            "loss", np.asarray(progress.loss)
        )
    out.save_to_disk(str(part / "data.hf"))


def open_training_run(cfg, command: str):
    """``(run_dir, model, tokenizer, tokenized_data)`` for a command that trains in this
    process (``train``, ``metasmoothness``): the run dir is refused early if it exists,
    the data is tokenized once, and the config is recorded before any training."""
    from ..store.run_dir import RunDir
    from ..training.data import load_tokenized
    from ..training.model import make_model, max_model_length

    if not cfg.run.run_path:
        raise BadInputError(f"{command} needs a run path")
    run = RunDir(cfg.run.run_path, overwrite=cfg.run.overwrite)
    model, tokenizer = make_model(cfg.model)
    data = load_tokenized(cfg.data, tokenizer, max_length=max_model_length(model, tokenizer))
    run.write_config(cfg, command=command)
    return run, model, tokenizer, data

