"""Building the ``tiny`` assets: a byte-level BPE tokenizer, a GPT-NeoX causal LM with a
few million parameters trained for a few hundred AdamW steps (so its gradients carry real
signal; the optimizer's second moments are saved so Adam normalizers can be tested), a
paragraph corpus and a query set, all derived from the pydoc text.

Everything is seeded, so two builds on the same software stack produce the same files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import platform
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bergson_ray.defaults.build_cache import write_manifest
from bergson_ray.defaults.pydoc_corpus import corpus_paragraphs, encode, pydoc_texts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

VERSION = "tiny-v2"
"""Bump when anything below changes the built files, so stale caches are not reused."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")  # ids 0 and 1, as in Pythia
VOCAB_SIZE = 4096
MAX_POSITIONS = 512
SEED = 0
N_QUERY = 32
TRAIN_BATCH = 8
TRAIN_SEQ_LEN = 64
TRAIN_LR = 5e-3
BUILD_THREADS = 1
"""The build pins torch to one intra-op thread: results are then bit-identical whichever
process builds (thread count changes float summation order), and on a busy 2-core
machine one thread is several times faster than two spinning OpenMP threads."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""Role headers are plain text (not special tokens) so the vocabulary keeps exactly two
specials; the message content is copied verbatim, which lets the tokenizer find each
assistant turn by character offsets."""


@dataclass(frozen=True)
class TinyAssets:
    """Paths of a completed tiny build (all plain directories on local disk)."""

    root: Path
    model_dir: Path
    """``save_pretrained`` model + tokenizer + ``optimizer_state.safetensors``."""
    corpus_dir: Path
    """``datasets.Dataset.save_to_disk`` dir, column ``text``."""
    query_dir: Path
    """``save_to_disk`` dir, columns ``text`` and ``src_idx`` (row in the corpus)."""

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / "manifest.json").read_text())


def assets_at(root: Path) -> TinyAssets:
    return TinyAssets(
        root=root,
        model_dir=root / "model",
        corpus_dir=root / "corpus",
        query_dir=root / "query",
    )


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _train_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(pydoc_texts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[0],
        unk_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[1],
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5 records its own backend class name, which 4.x cannot load.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return tokenizer


def _init_model(vocab_size: int):
    """Random-init GPT-NeoX (~1.8M params), seeded without touching the global RNG."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=MAX_POSITIONS,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = GPTNeoXForCausalLM(cfg)
    return model.float()


def _train(model, token_stream: list[int], steps: int) -> tuple[dict, dict]:
    """Short AdamW run on random windows; returns (second moments, loss log).

    Warm-up then cosine decay, gradient clipping: enough to take the loss well below
    the uniform ``ln(vocab)`` so gradients are meaningful, in well under a minute.
    """
    import torch

    data = torch.tensor(token_stream, dtype=torch.long)
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    losses: list[float] = []
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - TRAIN_SEQ_LEN, (TRAIN_BATCH,), generator=gen)
        x = torch.stack([data[s : s + TRAIN_SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    index = {id(p): n for n, p in model.named_parameters()}
    moments = {
        f"{index[id(p)]}.exp_avg_sq": st["exp_avg_sq"].detach().clone().contiguous()
        for p, st in opt.state.items()
    }
    tail = losses[-10:] or [float("nan")]
    summary = {
        "steps": steps,
        "loss_first": losses[0] if losses else None,
        "loss_last10_mean": sum(tail) / len(tail),
    }
    return moments, summary


def build_tiny(root: Path, train_steps: int) -> None:
    """Build every tiny asset into ``root`` (a fresh temp dir); manifest last."""
    import datasets
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    assets = assets_at(root)
    assets.model_dir.mkdir(parents=True)

    tokenizer = _train_tokenizer(assets.model_dir)
    paragraphs = corpus_paragraphs(tokenizer)
    datasets.Dataset.from_dict({"text": paragraphs}).save_to_disk(str(assets.corpus_dir))
    q_idx = sorted(random.Random(SEED).sample(range(len(paragraphs)), N_QUERY))
    datasets.Dataset.from_dict(
        {"text": [paragraphs[i] for i in q_idx], "src_idx": q_idx}
    ).save_to_disk(str(assets.query_dir))
    t_data = time.perf_counter()

    stream: list[int] = []
    for ids in encode(tokenizer, paragraphs):
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    with _torch_threads(BUILD_THREADS):
        model = _init_model(len(tokenizer))
        with torch.inference_mode():
            x = torch.tensor(stream[: 4 * TRAIN_SEQ_LEN]).view(4, TRAIN_SEQ_LEN)
            init_loss = float(model(input_ids=x, labels=x).loss)
        moments, train_log = _train(model, stream, train_steps)
    t_train = time.perf_counter()

    model.save_pretrained(str(assets.model_dir), safe_serialization=True)
    save_file(
        moments,
        str(assets.model_dir / "optimizer_state.safetensors"),
        metadata={"optimizer": "AdamW", "steps": str(train_steps), "betas": "0.9,0.95"},
    )
    weights = assets.model_dir / "model.safetensors"
    manifest = {
        "version": VERSION,
        "seed": SEED,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "train_config": {
            "batch": TRAIN_BATCH,
            "seq_len": TRAIN_SEQ_LEN,
            "lr": TRAIN_LR,
            "threads": BUILD_THREADS,
        },
        "vocab_size": len(tokenizer),
        "params": sum(p.numel() for p in model.parameters()),
        "corpus_rows": len(paragraphs),
        "query_src_idx": q_idx,
        "init_loss": init_loss,
        "train": train_log,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "seconds": {
            "data": round(t_data - t0, 2),
            "train": round(t_train - t_data, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
    }
    write_manifest(root / "manifest.json", manifest)
    log.info(
        "built tiny assets in %.1fs (train %.1fs, loss %.2f -> %.2f)",
        manifest["seconds"]["total"],
        manifest["seconds"]["train"],
        init_loss,
        train_log["loss_last10_mean"],
    )
