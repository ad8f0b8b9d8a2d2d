"""The quickstart: tiny model -> gradient store on local Ray -> nearest training docs.

Everything is built locally (no hub access): the embedded tiny GPT-NeoX, its BPE
tokenizer and the pydoc corpus. The search at the end is an exact cosine scan of
the store, done in-process with the same engine the workers used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import TINY, BuildConfig, DataConfig, GradientConfig, ModelConfig, RunConfig

log = logging.getLogger(__name__)

EXAMPLE_PROMPTS = (
    "The for statement is used to iterate over the elements of a sequence.",
    "An exception is raised when an index is out of range.",
)


@dataclass
class Hit:
    row: int
    score: float
    text: str


def query_rows(store_path: Path, texts: list[str]) -> torch.Tensor:
    """Query gradients made exactly like the store's rows (same config.yaml settings)."""
    from ..config_io import load_step_config
    from ..data.batching import collate
    from ..data.tokenize import tokenize_rows
    from ..gradients.engine import GradientEngine
    from ..gradients.model_loading import load_model

    cfg = load_step_config(store_path, BuildConfig, "build")
    model, tok = load_model(cfg.model)
    engine = GradientEngine(model, cfg.grad)
    docs = tokenize_rows({cfg.data.prompt_column: list(texts)}, tok, cfg.data, None)
    return torch.cat([engine.compute(collate([d])).rows.float() for d in docs])


def top_k_cosine(store_path: Path, queries: torch.Tensor, k: int) -> list[list[Hit]]:
    """Exact cosine top-k, streaming the store in chunks (memory flat in store size)."""
    from ..store.gradient_store import GradientStore

    store = GradientStore.open(store_path)
    q = queries / queries.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best_s = torch.full((len(q), 0), -np.inf)
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    for chunk in store.iter_chunks(4096):
        rows = chunk.rows
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        s = q @ rows.T
        best_s = torch.cat([best_s, s], dim=1)
        best_i = torch.cat([best_i, torch.arange(chunk.start, chunk.start + len(rows)).expand(len(q), -1)], 1)
        top = best_s.topk(min(k, best_s.shape[1]), dim=1)
        best_s, best_i = top.values, best_i.gather(1, top.indices)
    data = store.data
    text_col = "text" if data is not None and "text" in data.column_names else None
    out = []
    for qi in range(len(q)):
        hits = []
        for s, i in zip(best_s[qi].tolist(), best_i[qi].tolist()):
            text = data[int(i)][text_col] if text_col else ""
            hits.append(Hit(int(i), float(s), text))
        out.append(hits)
    return out


def quickstart(
    run_path: str = "runs/quickstart",
    prompts: tuple[str, ...] = EXAMPLE_PROMPTS,
    k: int = 5,
    projection_dim: int = 16,
    num_workers: int = 0,
    overwrite: bool = True,
) -> list[list[Hit]]:
    from ..defaults.tiny import ensure_tiny_assets
    from .build import build

    assets = ensure_tiny_assets()
    log.info("tiny default ready at %s", assets.root)
    cfg = BuildConfig(
        run=RunConfig(run_path=str(Path(run_path) / "index"), overwrite=overwrite),
        model=ModelConfig(model=TINY),
        data=DataConfig(dataset=TINY, truncation=True),
        grad=GradientConfig(projection_dim=projection_dim),
    )
    cfg.ray.num_workers = num_workers
    store = build(cfg)
    return top_k_cosine(store, query_rows(store, list(prompts)), k)


def format_hits(prompts, results: list[list[Hit]], width: int = 110) -> str:
    lines = []
    for prompt, hits in zip(prompts, results):
        lines.append(f"\nquery: {prompt}")
        for rank, h in enumerate(hits, 1):
            snippet = " ".join(h.text.split())[:width]
            lines.append(f"  {rank}. row {h.row:5d}  cos {h.score:+.3f}  {snippet}")
    return "\n".join(lines)
