"""The quickstart: tiny model -> gradient store on local Ray -> nearest training docs.

Everything is built locally (no hub access): the embedded tiny GPT-NeoX, its BPE
tokenizer and the pydoc corpus. The search at the end is an exact cosine search of
the store, done in-process by :class:`~bergson_ray.query.attributor.Attributor` with the
same engine the workers used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

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


def nearest_docs(store_path: str | Path, prompts: list[str], k: int) -> list[list[Hit]]:
    """Exact cosine top-k over the store, with query gradients made the way its rows were
    (same ``config.yaml`` settings, optimizer normalizers included)."""
    from ..query.attributor import Attributor

    attr = Attributor(store_path, unit_norm=True, save=False)  # Flat index: exact search
    return [
        [Hit(int(i), float(s), t or "") for i, s, t in zip(r.ids, r.scores, r.texts)]
        for r in attr.query(list(prompts), k=k)
    ]


def quickstart(
    run_path: str = "runs/quickstart",
    prompts: tuple[str, ...] = EXAMPLE_PROMPTS,
    k: int = 5,
    projection_dim: int = 16,
    num_workers: int = 0,
    overwrite: bool = True,
    split: str = "train",
) -> list[list[Hit]]:
    from ..defaults.tiny import ensure_tiny_assets
    from .build import build

    assets = ensure_tiny_assets()
    log.info("tiny default ready at %s", assets.root)
    cfg = BuildConfig(
        run=RunConfig(run_path=str(Path(run_path) / "index"), overwrite=overwrite),
        model=ModelConfig(model=TINY),
        data=DataConfig(dataset=TINY, split=split, truncation=True),
        grad=GradientConfig(projection_dim=projection_dim),
    )
    cfg.ray.num_workers = num_workers
    store = build(cfg)
    return nearest_docs(store, list(prompts), k)


def format_hits(prompts, results: list[list[Hit]], width: int = 110) -> str:
    lines = []
    for prompt, hits in zip(prompts, results):
        lines.append(f"\nquery: {prompt}")
        for rank, h in enumerate(hits, 1):
            snippet = " ".join(h.text.split())[:width]
            lines.append(f"  {rank}. row {h.row:5d}  cos {h.score:+.3f}  {snippet}")
    return "\n".join(lines)
