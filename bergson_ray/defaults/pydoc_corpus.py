"""Text of the embedded default: paragraphs and fixed-length windows of Python's own
``pydoc_data.topics`` (shipped with CPython), so nothing is downloaded."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

MIN_PARAGRAPH_CHARS = 40
MAX_PARAGRAPH_TOKENS = 256
"""Longer paragraphs are dropped so every corpus row fits the default token budget."""


def encode(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens, via the Rust backend (no max-length warnings)."""
    return [
        e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ]


def pydoc_texts() -> list[str]:
    """The pydoc topic texts in a fixed (sorted-key) order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def corpus_paragraphs(tokenizer: PreTrainedTokenizerFast) -> list[str]:
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
    lengths = [len(ids) for ids in encode(tokenizer, out)]
    return [p for p, n in zip(out, lengths) if n <= MAX_PARAGRAPH_TOKENS]


def exact_length_windows(
    tokenizer: PreTrainedTokenizerFast, n_docs: int, n_tokens: int
) -> list[dict]:
    """Evenly spaced token windows whose decoded text re-encodes to exactly ``n_tokens``.

    Decoding a window and encoding the text again can change the token count at the
    window edges (a cut inside a UTF-8 character, a merge across the cut); such windows
    are skipped by nudging the start forward one token.
    """
    full = "\n\n".join(text.strip() for text in pydoc_texts())
    ids = encode(tokenizer, [full])[0]
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
                if len(encode(tokenizer, [text])[0]) == n_tokens:
                    rows.append({"text": text, "start_token": start})
                    break
            start += 1
            if len(tried) >= span:
                raise RuntimeError("could not find enough exact-length windows")
    return rows
