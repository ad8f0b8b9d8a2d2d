"""The embedded ``tiny`` default: a small model, tokenizer and corpus built locally.

Why: every command must run (and every test must be able to run) on a laptop with no
network. Instead of downloading anything, we derive all assets from the text of
Python's own ``pydoc_data.topics`` (shipped with CPython): a byte-level BPE tokenizer,
a GPT-NeoX causal LM with a few million parameters, a paragraph corpus and a query set.
The model is trained for a few hundred AdamW steps so that its gradients carry real
signal, and the optimizer's second moments are saved so Adam normalizers can be tested.

Everything is seeded, so two builds on the same software stack produce the same files.
Builds are cached: a build writes into a temporary directory, writes ``manifest.json``
last and renames the directory into place, all under an ``fcntl`` file lock, so
concurrent callers (pytest workers, Ray actors) build once and never see half a build.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bergson_ray.config import TINY

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

VERSION = "tiny-v2"
"""Bump when anything below changes the built files, so stale caches are not reused."""

CACHE_ENV = "BERGSON_RAY_CACHE"
SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")  # ids 0 and 1, as in Pythia
VOCAB_SIZE = 4096
MAX_POSITIONS = 512
SEED = 0
MIN_PARAGRAPH_CHARS = 40
MAX_PARAGRAPH_TOKENS = 256
"""Longer paragraphs are dropped so every corpus row fits the default token budget."""
N_QUERY = 32
DEFAULT_TRAIN_STEPS = 200
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


# ----------------------------------------------------------------------------- cache


def cache_base(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory that holds the tiny builds: argument, ``$BERGSON_RAY_CACHE``, or
    ``~/.cache/bergson_ray``."""
    base = cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/bergson_ray"
    return Path(os.path.expanduser(str(base))).resolve()


def _assets_at(root: Path) -> TinyAssets:
    return TinyAssets(
        root=root,
        model_dir=root / "model",
        corpus_dir=root / "corpus",
        query_dir=root / "query",
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock; released automatically if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_once(final: Path, build: Callable[[Path], None]) -> None:
    """Run ``build(tmp_dir)`` unless ``final/manifest.json`` exists; publish atomically.

    ``build`` must write ``manifest.json`` last. The temp dir lives next to ``final`` so
    the closing ``rename`` is atomic on one filesystem.
    """
    if (final / "manifest.json").exists():
        return
    with _file_lock(final.parent / f".{final.name}.lock"):
        if (final / "manifest.json").exists():  # another process finished meanwhile
            return
        # Holding the lock, any temp dir is a leftover of a killed builder: drop it.
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            with _quiet_progress():
                build(tmp)
            if not (tmp / "manifest.json").exists():
                raise RuntimeError(f"tiny build into {tmp} wrote no manifest.json")
            if final.exists():  # a manifest-less leftover: never complete, safe to drop
                shutil.rmtree(final)
            os.rename(tmp, final)
            log.info("tiny assets ready at %s", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide datasets/transformers progress bars while building (restored afterwards):
    a build may run inside a Ray worker or a test, where bars are only noise."""
    import datasets
    from transformers.utils import logging as hf_logging

    ds_on = datasets.is_progress_bar_enabled()
    hf_on = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if ds_on:
            datasets.enable_progress_bars()
        if hf_on:
            hf_logging.enable_progress_bar()


def _encode(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens, via the Rust backend (no max-length warnings)."""
    return [
        e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- public API


def ensure_tiny_assets(
    cache_dir: str | os.PathLike | None = None, *, train_steps: int = DEFAULT_TRAIN_STEPS
) -> TinyAssets:
    """Return the tiny assets, building them first if the cache has no complete copy.

    ``train_steps`` exists so tests can build cheap variants; a non-default value gets
    its own cache directory so it never shadows the real default.
    """
    name = VERSION if train_steps == DEFAULT_TRAIN_STEPS else f"{VERSION}-steps{train_steps}"
    root = cache_base(cache_dir) / name
    _build_once(root, lambda tmp: _build_tiny(tmp, train_steps))
    return _assets_at(root)


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
        rows = _exact_length_windows(tokenizer, n_docs, n_tokens)
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp / "data"))
        _write_json(tmp / "manifest.json", {"n_docs": n_docs, "n_tokens": n_tokens})

    _build_once(final, build)
    return datasets.load_from_disk(str(final / "data"))


# ----------------------------------------------------------------------------- corpus


def pydoc_texts() -> list[str]:
    """The pydoc topic texts in a fixed (sorted-key) order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _paragraphs(tokenizer: PreTrainedTokenizerFast) -> list[str]:
    """Unique pydoc paragraphs of >= 40 chars and <= 256 tokens, in a fixed order.

    Duplicates are dropped so a query copied from the corpus has exactly one source row.
    """
    seen: set[str] = set()
    out: list[str] = []
    for text in pydoc_texts():
        for para in text.split("\n\n"):
            para = para.strip()
            if len(para) < MIN_PARAGRAPH_CHARS or para in seen:
                continue
            seen.add(para)
            out.append(para)
    lengths = [len(ids) for ids in _encode(tokenizer, out)]
    return [p for p, n in zip(out, lengths) if n <= MAX_PARAGRAPH_TOKENS]


def _exact_length_windows(
    tokenizer: PreTrainedTokenizerFast, n_docs: int, n_tokens: int
) -> list[dict]:
    """Evenly spaced token windows whose decoded text re-encodes to exactly ``n_tokens``.

    Decoding a window and encoding the text again can change the token count at the
    window edges (a cut inside a UTF-8 character, a merge across the cut); such windows
    are skipped by nudging the start forward one token.
    """
    full = "\n\n".join(text.strip() for text in pydoc_texts())
    ids = _encode(tokenizer, [full])[0]
    span = len(ids) - n_tokens
    if span <= 0:
        raise ValueError(f"the pydoc corpus has only {len(ids)} tokens; cannot cut {n_tokens}")
    rows: list[dict] = []
    tried: set[int] = set()
    for k in range(n_docs):
        start = (k * span) // max(n_docs - 1, 1) if n_docs > 1 else 0
        while True:
            start %= span
            if start not in tried:
                tried.add(start)
                text = tokenizer.decode(
                    ids[start : start + n_tokens], clean_up_tokenization_spaces=False
                )
                if len(_encode(tokenizer, [text])[0]) == n_tokens:
                    rows.append({"text": text, "start_token": start})
                    break
            start += 1
            if len(tried) >= span:
                raise RuntimeError("could not find enough exact-length windows")
    return rows


# ----------------------------------------------------------------------------- build steps


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


def _build_tiny(root: Path, train_steps: int) -> None:
    """Build every tiny asset into ``root`` (a fresh temp dir); manifest last."""
    import datasets
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    assets = _assets_at(root)
    assets.model_dir.mkdir(parents=True)

    tokenizer = _train_tokenizer(assets.model_dir)
    paragraphs = _paragraphs(tokenizer)
    datasets.Dataset.from_dict({"text": paragraphs}).save_to_disk(str(assets.corpus_dir))
    q_idx = sorted(random.Random(SEED).sample(range(len(paragraphs)), N_QUERY))
    datasets.Dataset.from_dict(
        {"text": [paragraphs[i] for i in q_idx], "src_idx": q_idx}
    ).save_to_disk(str(assets.query_dir))
    t_data = time.perf_counter()

    stream: list[int] = []
    for ids in _encode(tokenizer, paragraphs):
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
    _write_json(root / "manifest.json", manifest)
    log.info(
        "built tiny assets in %.1fs (train %.1fs, loss %.2f -> %.2f)",
        manifest["seconds"]["total"],
        manifest["seconds"]["train"],
        init_loss,
        train_log["loss_last10_mean"],
    )
