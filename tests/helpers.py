"""Builders and assertions shared by the tests: ``from helpers import ...``.

pytest puts this directory on ``sys.path`` (``tests/`` has no ``__init__.py``), so the
test modules import it by its bare name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bergson_ray.utils.ray_env import LOOPBACK_ENV

TINY_SPLIT = "train[:40]"
TINY_BUILD = dict(dataset="tiny", split=TINY_SPLIT, projection_dim=8, truncation=True)
"""The small tiny-corpus build most Ray tests run (40 documents, 8x8 projections)."""


# --- builders ---------------------------------------------------------------------------
VOCAB = 97


def tiny_neox(
    *,
    hidden: int = 32,
    layers: int = 2,
    intermediate: int = 48,
    bias: bool = True,
    vocab: int = VOCAB,
    seed: int = 0,
) -> torch.nn.Module:
    """A randomly initialised GPT-NeoX small enough for autograd ground truth (float32)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=intermediate,
        max_position_embeddings=64,
        attention_bias=bias,
    )
    return GPTNeoXForCausalLM(cfg).float()


def tiny_gpt2(*, hidden: int = 32, layers: int = 2, vocab: int = VOCAB, seed: int = 0):
    """A randomly initialised GPT-2 (HF ``Conv1D`` layers), float32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).float()


def random_docs(lengths, seed: int = 1, vocab: int = VOCAB) -> list[torch.Tensor]:
    """Token id sequences of the given lengths (ids >= 2: never pad or eos)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g) for n in lengths]


def pad_batch(docs, prompt_lens: int | list[int] = 0) -> SimpleNamespace:
    """Right-padded batch like ``data.batching.collate`` (pad id 0, label -100); the first
    ``prompt_lens`` tokens of each document carry no loss."""
    if isinstance(prompt_lens, int):
        prompt_lens = [prompt_lens] * len(docs)
    s = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), s, dtype=torch.long)
    labels = torch.full((len(docs), s), -100, dtype=torch.long)
    for i, (d, p) in enumerate(zip(docs, prompt_lens)):
        ids[i, : len(d)] = d
        labels[i, p : len(d)] = d[p:]
    return SimpleNamespace(
        input_ids=ids, labels=labels, lengths=torch.tensor([len(d) for d in docs])
    )


def tiny_runner_spec(split: str = TINY_SPLIT, token_batch_size: int = 4096, **grad):
    """The in-process twin of a ``TINY_BUILD``-style build: a ``RunnerSpec`` for ``split``."""
    from bergson_ray.config import BatchConfig, DataConfig, GradientConfig, ModelConfig
    from bergson_ray.runners.gradient_runner import RunnerSpec

    return RunnerSpec(
        model=ModelConfig(),
        grad=GradientConfig(**{"projection_dim": 8, **grad}),
        data=DataConfig(split=split, truncation=True),
        batch=BatchConfig(token_batch_size=token_batch_size),
    )


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child that starts its own loopback Ray, offline,
    plus ``extra``: without ``RAY_ADDRESS`` (a test never joins a cluster by accident)
    unless ``extra`` names one."""
    env = {**os.environ, **LOOPBACK_ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return {**env, **extra}


# --- reading results --------------------------------------------------------------------
def rows_of(path) -> np.ndarray:
    """Every row of the gradient store at ``path``, float32."""
    from bergson_ray.store.gradient_store import GradientStore

    store = GradientStore.open(path)
    return store.rows(np.arange(store.num_grads)).numpy()


def summary_of(path) -> dict:
    return json.loads((Path(path) / "summary.json").read_text())


# --- assertions -------------------------------------------------------------------------
def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not count)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def assert_same(a: np.ndarray, b: np.ndarray, tol: float = 1e-6) -> None:
    """Equal up to ``tol`` of the largest entry: only fp32 summation order may differ."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
    bad = (
        np.flatnonzero(np.abs(a - b).reshape(len(a), -1).max(1) > tol * np.abs(b).max())
        if a.ndim > 1
        else []
    )
    assert err <= tol, (
        f"max deviation {err:.2e} of the largest entry (tol {tol:.0e}); rows {list(bad)[:10]}"
    )


def rel(x, y) -> float:
    """Relative Frobenius error ``|x - y| / |y|`` in float64."""
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    return float((x - y).norm() / y.norm().clamp_min(1e-30))
