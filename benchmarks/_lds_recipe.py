"""The LDS demo's recipe (``benchmarks/lds.py``): data, training settings, and the same
settings spelled as bergson's flags so both programs see one model, one corpus, one
query set and one training recipe.

Data: short paragraphs (12-48 tiny tokens) of the embedded pydoc corpus, drawn from one
contiguous region of it so that neighbouring paragraphs of the same topic end up in the
training set; ``n_query`` of the drawn paragraphs are held out as queries (never trained
on). Both sets are ``save_to_disk`` directories that bergson reads too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIN_TOKENS, MAX_TOKENS = 12, 48
TOKEN_BATCH = 512
"""Gradient passes' token budget (bergson refuses more than the tiny model's 512)."""
PROJECTION_DIM = 16
"""Per-module projection of the gradient dot/cosine methods and TrackStar (bergson's
default there; EK-FAC, LiSSA and SOURCE use full gradients)."""
TRAK_PROJECTION_DIM = 64
"""TRAK's one global projection (bergson's default, 16, keeps 16 numbers of the whole
gradient): below the quick recipe's 96 documents, so the Gram stays invertible."""
LISSA = {"depth": 60, "repeats": 2, "batch_size": 8, "scale": 20.0, "damping": 0.01}
"""LiSSA's series (the same flags for both programs). ``scale`` must exceed half the
damped Gauss-Newton Hessian's largest eigenvalue; our estimate of that eigenvalue on the
fine-tuned demo model (``lissa.json``: ``top_eigenvalue_estimate``) is 12.3 for the full
recipe and 14.7 for ``--quick``, so 20 converges with room for batch noise. depth x
repeats x queries Hessian-vector products of ``batch_size`` documents (960 for the full
recipe) keep it to a few minutes."""
SOURCE_SEGMENTS = 2
"""SOURCE segments; the fine-tune saves ``SOURCE_CHECKPOINTS`` states after step 0."""
SOURCE_CHECKPOINTS = 4


@dataclass(frozen=True)
class Recipe:
    """How the model is fine-tuned (bergson's trainer options) and on what.

    The training schedule is bergson's own MAGIC recipe (``examples/compare_wikitext/
    magic.yaml``, per-query LDS 0.93-0.98 on GPT-2 / WikiText): AdamW with
    ``eps_root`` 1e-8, which keeps the update smooth in the data weights, a polynomial
    schedule from ``lr_start`` through a 25 % warm-up to ``lr`` and down to ``lr / 10``.
    With the trainer's defaults instead (``eps_root`` 1e-17, a constant 2e-3), MAGIC's
    LDS on the same data was 0.66-0.83: the tiny demo's training is then far from
    smooth, and no first-order method can follow it.
    """

    docs: int = 256
    queries: int = 8
    lr: float = 8e-4
    epochs: int = 2
    batch_size: int = 32
    eps_root: float = 1e-8
    schedule: str = "polynomial"
    lr_start: float = 1e-6
    warmup: float = 0.25
    seed: int = 0
    """Seed of the document draw (the trainer's shuffle keeps bergson's default, 42)."""

    def training_kwargs(self) -> dict:
        """Keyword arguments (our flag names) of ``train``/``validate``/``magic``.

        One torch thread per process: the figures per worker are then comparable, and
        two workers on two cores do not oversubscribe them."""
        return dict(lr=self.lr, num_epochs=self.epochs, batch_size=self.batch_size,
                    eps_root=self.eps_root, lr_scheduler_type=self.schedule,
                    lr_start=self.lr_start, lr_end=self.lr / 10, warmup_steps=self.warmup,
                    save_mode="sqrt", save_optimizer_state="none", torch_threads=1)  # fmt: skip

    def bergson_training_flags(self) -> list[str]:
        return ["--lr", str(self.lr), "--num_epochs", str(self.epochs),
                "--batch_size", str(self.batch_size), "--eps_root", str(self.eps_root),
                "--lr_scheduler_type", self.schedule, "--lr_start", str(self.lr_start),
                "--lr_end", str(self.lr / 10), "--warmup_steps", str(self.warmup),
                "--save_mode", "sqrt", "--save_optimizer_state", "none",
                "--wandb_project", ""]  # fmt: skip


def source_save_interval(recipe: Recipe, docs: int) -> int:
    """Steps between the fine-tune's saved states, so that about ``SOURCE_CHECKPOINTS``
    states follow step 0 (SOURCE's trajectory)."""
    steps = -(-docs // recipe.batch_size) * recipe.epochs
    return max(1, steps // SOURCE_CHECKPOINTS)


def prepare_data(root: Path, recipe: Recipe) -> tuple[Path, Path, dict]:
    """Write ``root/train`` and ``root/query``; return their paths and a description."""
    import datasets
    import numpy as np

    from bergson_ray.defaults.tiny import ensure_tiny_assets, load_tiny_tokenizer

    assets = ensure_tiny_assets()
    train_dir, query_dir = root / "train", root / "query"
    corpus = datasets.load_from_disk(str(assets.corpus_dir))
    tok = load_tiny_tokenizer(assets)
    lengths = np.array([len(ids) for ids in tok(list(corpus["text"]))["input_ids"]])
    cand = np.flatnonzero((lengths >= MIN_TOKENS) & (lengths <= MAX_TOKENS))
    need = recipe.docs + recipe.queries
    if len(cand) < need:
        raise SystemExit(f"only {len(cand)} short paragraphs; ask for fewer --docs")
    region = cand[: min(len(cand), int(need * 1.3))]
    rng = np.random.default_rng(recipe.seed)
    drawn = np.sort(rng.choice(region, need, replace=False))
    held = np.sort(drawn[rng.choice(need, recipe.queries, replace=False)])
    train = np.setdiff1d(drawn, held)
    if not (train_dir.exists() and query_dir.exists()):
        corpus.select(train.tolist()).save_to_disk(str(train_dir))
        corpus.select(held.tolist()).save_to_disk(str(query_dir))
    info = {
        "train_docs": len(train), "query_docs": len(held),
        "train_tokens": int(lengths[train].sum()),
        "corpus_rows": [int(region[0]), int(region[-1])],
        "query_rows": held.tolist(),
    }  # fmt: skip
    return train_dir, query_dir, info
