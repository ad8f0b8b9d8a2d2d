"""Randomly initialised GPT-NeoX models with the shapes of real Pythia checkpoints.

Nothing is downloaded: the config is written here, the weights drawn from a fixed seed,
and the tiny default's tokenizer saved alongside (its ids are a subset of the vocabulary).
A shape matters for speed and memory, not the weights: Pythia-14M has the tiny default's
width but a 50,304-token vocabulary, so its LM head and logits dominate a step, as in
real small models.

    python benchmarks/_models.py pythia-160m /tmp/pythia160m-random
"""

from __future__ import annotations

import sys
from pathlib import Path

SHAPES = {
    "pythia-14m": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512),
    "pythia-160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def random_model(shape: str, dest: Path) -> Path:
    """Write (once) a random model of ``shape`` (a key of ``SHAPES``) to ``dest``."""
    if (dest / "config.json").exists():
        return dest
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from bergson_ray.defaults.tiny import ensure_tiny_assets, load_tiny_tokenizer

    cfg = GPTNeoXConfig(vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25,
                        use_parallel_residual=True, tie_word_embeddings=False, **SHAPES[shape])  # fmt: skip
    torch.manual_seed(0)
    tmp = dest.with_name(dest.name + ".tmp")
    GPTNeoXForCausalLM(cfg).save_pretrained(tmp)
    tokenizer = load_tiny_tokenizer(ensure_tiny_assets())
    tokenizer.model_max_length = cfg.max_position_embeddings  # bergson caps batches by it
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)
    return dest


def model_path(name: str, root: Path) -> str:
    """``--model`` of the benchmarks: ``tiny`` (the default), a shape of ``SHAPES``
    (written under ``root``), or a model directory."""
    if name == "tiny":
        from bergson_ray.defaults.tiny import ensure_tiny_assets

        return str(ensure_tiny_assets().model_dir)
    if name in SHAPES:
        return str(random_model(name, root / f"{name}-random"))
    return name


if __name__ == "__main__":
    path = random_model(sys.argv[1], Path(sys.argv[2]))
    print("model", path, sys.argv[1], "shape, random weights")
