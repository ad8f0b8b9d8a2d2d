"""Locally built default assets (the ``tiny`` model and corpus); nothing is downloaded."""

from bergson_ray.defaults.tiny import (
    ensure_tiny_assets,
    load_tiny_tokenizer,
    make_long_corpus,
    resolve_dataset,
    resolve_model_path,
)
from bergson_ray.defaults.tiny_build import TinyAssets

__all__ = [
    "TinyAssets",
    "ensure_tiny_assets",
    "load_tiny_tokenizer",
    "make_long_corpus",
    "resolve_dataset",
    "resolve_model_path",
]
