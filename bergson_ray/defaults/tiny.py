"""The embedded ``tiny`` default: a small model, tokenizer and corpus built locally.

Why: every command must run (and every test must be able to run) on a laptop with no
network. Instead of downloading anything, all assets derive from the text of Python's
own ``pydoc_data.topics`` (:mod:`~bergson_ray.defaults.pydoc_corpus`); how they are built
is :mod:`~bergson_ray.defaults.tiny_build`, how builds are cached (once, atomically, under
a file lock) is :mod:`~bergson_ray.defaults.build_cache`. ``model == "tiny"`` and
``dataset == "tiny"`` resolve here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from bergson_ray.config import TINY
from bergson_ray.defaults.build_cache import build_once, cache_base, write_manifest
from bergson_ray.defaults.pydoc_corpus import exact_length_windows
from bergson_ray.defaults.tiny_build import VERSION, TinyAssets, assets_at, build_tiny

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerFast

DEFAULT_TRAIN_STEPS = 200


def ensure_tiny_assets(
    cache_dir: str | os.PathLike | None = None, *, train_steps: int = DEFAULT_TRAIN_STEPS
) -> TinyAssets:
    """Return the tiny assets, building them first if the cache has no complete copy.

    ``train_steps`` exists so tests can build cheap variants; a non-default value gets
    its own cache directory so it never shadows the real default.
    """
    name = VERSION if train_steps == DEFAULT_TRAIN_STEPS else f"{VERSION}-steps{train_steps}"
    root = cache_base(cache_dir) / name
    build_once(root, lambda tmp: build_tiny(tmp, train_steps))
    return assets_at(root)


def resolve_model_path(name: str) -> str:
    """``"tiny"`` -> the tiny model dir (built on demand); any other name unchanged."""
    return str(ensure_tiny_assets().model_dir) if name == TINY else name


def resolve_dataset(name: str) -> str:
    """``"tiny"`` -> the tiny corpus ``save_to_disk`` dir; any other name unchanged."""
    return str(ensure_tiny_assets().corpus_dir) if name == TINY else name


def load_tiny_tokenizer(assets: TinyAssets | None = None) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    assets = assets or ensure_tiny_assets()
    return PreTrainedTokenizerFast.from_pretrained(str(assets.model_dir))


def make_long_corpus(
    n_docs: int = 1000, n_tokens: int = 256, cache_dir: str | os.PathLike | None = None
) -> datasets.Dataset:
    """``n_docs`` documents that each re-tokenize to exactly ``n_tokens`` tiny tokens.

    For throughput benchmarks, where every document must cost the same. Built from
    overlapping windows over the whole pydoc text and cached next to the tiny assets.
    """
    import datasets

    if n_docs < 1 or n_tokens < 1:
        raise ValueError("make_long_corpus needs n_docs >= 1 and n_tokens >= 1")
    assets = ensure_tiny_assets(cache_dir)
    final = assets.root.parent / f"{VERSION}-long-{n_docs}x{n_tokens}"

    def build(tmp: Path) -> None:
        tokenizer = load_tiny_tokenizer(assets)
        rows = exact_length_windows(tokenizer, n_docs, n_tokens)
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp / "data"))
        write_manifest(tmp / "manifest.json", {"n_docs": n_docs, "n_tokens": n_tokens})

    build_once(final, build)
    return datasets.load_from_disk(str(final / "data"))
