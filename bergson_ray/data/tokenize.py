"""Turn dataset rows into token ids and loss labels.

Why labels and not a loss mask: we follow the Hugging Face convention so the same
``TokenizedDoc`` feeds a plain ``model(input_ids, labels=...)`` call and our own
per-document losses. ``labels[t] == input_ids[t]`` where token ``t`` is a prediction
target and ``-100`` elsewhere; the logits at position ``s`` are scored against
``labels[s + 1]``.

Three row kinds (``DataConfig``): plain text (every token is a target), prompt/completion
(rendered with the tokenizer's chat template as a user/assistant exchange; only the
completion is a target) and conversations (only assistant turns are targets). Chat
strings are tokenized without adding special tokens, because the template already
contains whatever BOS the model expects; adding them again would double it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bergson_ray.config import DataConfig
from bergson_ray.errors import BadInputError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class TokenizedDoc:
    """One document ready for packing: ids, HF-style labels, and its loss weight."""

    input_ids: np.ndarray
    """int64 ``[L]``."""
    labels: np.ndarray
    """int64 ``[L]``; ``-100`` where the token is not a prediction target."""
    advantage: float = 1.0
    """Multiplies the document's loss (GRPO advantage; 1.0 otherwise)."""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


# ----------------------------------------------------------------------------- helpers


def _row_name(i: int, row_ids: Sequence[int] | None) -> str:
    return f"row {row_ids[i]}" if row_ids is not None else f"row {i} of this batch"


def _as_text(value: Any, column: str, i: int, row_ids: Sequence[int] | None) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadInputError(
            f"{_row_name(i, row_ids)}: column {column!r} holds {type(value).__name__}, "
            "expected a string"
        )
    return value


def _as_messages(
    value: Any, column: str, i: int, row_ids: Sequence[int] | None
) -> list[dict[str, str]]:
    """Validate a conversation cell: a list of ``{"role", "content"}`` mappings."""
    where = f"{_row_name(i, row_ids)}: column {column!r}"
    if not isinstance(value, (list, tuple)):
        raise BadInputError(f"{where} must hold a list of messages, got {type(value).__name__}")
    messages = []
    for m in value:
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise BadInputError(f"{where}: every message needs 'role' and 'content' keys")
        content = "" if m["content"] is None else m["content"]
        if not isinstance(content, str):
            raise BadInputError(f"{where}: message content must be a string")
        messages.append({"role": str(m["role"]), "content": content})
    return messages


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _assistant_char_spans(
    tokenizer, messages: list[dict[str, str]], text: str, where: str
) -> list[tuple[int, int]]:
    """Character spans of each assistant message's content inside the rendered ``text``.

    Each turn is searched for only after the rendering of the conversation up to that
    turn (when the template renders prefixes consistently), so an answer that also
    appears verbatim in an earlier user message is not mistaken for it.
    """
    spans: list[tuple[int, int]] = []
    cursor = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or not message["content"]:
            continue
        try:
            prefix = _render(tokenizer, messages[:k], add_generation_prompt=True) if k else ""
        except Exception:  # some templates reject partial conversations; fall back
            prefix = ""
        if prefix and text.startswith(prefix):
            cursor = max(cursor, len(prefix))
        start = text.find(message["content"], cursor)
        if start < 0:
            raise BadInputError(
                f"{where}: assistant message {k} does not appear verbatim in the chat-template "
                "output (the template alters the message, e.g. strips whitespace)"
            )
        cursor = start + len(message["content"])
        spans.append((start, cursor))
    return spans


def _labels_from_spans(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> np.ndarray:
    """Mark as targets the tokens whose characters overlap any span."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    if not spans:
        return labels
    starts = np.array([a for a, _ in offsets], dtype=np.int64)
    ends = np.array([b for _, b in offsets], dtype=np.int64)
    ids_arr = np.asarray(ids, dtype=np.int64)
    for lo, hi in spans:
        hit = (starts < hi) & (ends > lo) & (ends > starts)
        labels[hit] = ids_arr[hit]
    return labels


def _tokenize_chats(
    convos: list[list[dict[str, str]]], tokenizer, row_ids: Sequence[int] | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    if not getattr(tokenizer, "chat_template", None):
        raise BadInputError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "completion_column and conversation_column need one"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise BadInputError("chat-formatted rows need a fast tokenizer (character offsets)")
    texts = [_render(tokenizer, c, add_generation_prompt=False) for c in convos]
    enc = tokenizer(
        texts,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        verbose=False,
    )
    out = []
    for i, (convo, text) in enumerate(zip(convos, texts)):
        spans = _assistant_char_spans(tokenizer, convo, text, _row_name(i, row_ids))
        ids = enc["input_ids"][i]
        labels = _labels_from_spans(ids, enc["offset_mapping"][i], spans)
        out.append((np.asarray(ids, dtype=np.int64), labels))
    return out


# ----------------------------------------------------------------------------- public


def tokenize_rows(
    rows: dict[str, list],
    tokenizer,
    cfg: DataConfig,
    max_length: int | None,
    *,
    row_ids: Sequence[int] | None = None,
) -> list[TokenizedDoc]:
    """Tokenize a batch of rows (column -> values) into documents.

    ``max_length``: documents longer than this are cut (``cfg.truncation``) or rejected
    with :class:`BadInputError` naming the row; ``None`` disables the check.
    ``row_ids`` (dataset positions of the rows) only make error messages precise.
    An ``advantage`` column in ``rows`` (see ``DatasetRows``) sets each doc's advantage.
    Empty documents are returned as-is; what to do with them is the caller's call.
    """
    if cfg.format_template:  # render first: the template's text is what gets tokenized
        rows, cfg = _apply_format_template(rows, cfg, row_ids)
    if cfg.completion_column and cfg.conversation_column:
        raise BadInputError("set completion_column or conversation_column, not both")
    lead = cfg.conversation_column or cfg.prompt_column
    if lead not in rows:
        raise BadInputError(f"rows have no column {lead!r}; available columns are {list(rows)}")

    if cfg.conversation_column:
        col = cfg.conversation_column
        convos = [_as_messages(v, col, i, row_ids) for i, v in enumerate(rows[col])]
        pairs = _tokenize_chats(convos, tokenizer, row_ids)
    elif cfg.completion_column:
        pc, cc = cfg.prompt_column, cfg.completion_column
        if cc not in rows:
            raise BadInputError(f"rows have no column {cc!r}; available columns are {list(rows)}")
        convos = [
            [
                {"role": "user", "content": _as_text(p, pc, i, row_ids)},
                {"role": "assistant", "content": _as_text(c, cc, i, row_ids)},
            ]
            for i, (p, c) in enumerate(zip(rows[pc], rows[cc]))
        ]
        pairs = _tokenize_chats(convos, tokenizer, row_ids)
    else:
        col = cfg.prompt_column
        texts = [_as_text(v, col, i, row_ids) for i, v in enumerate(rows[col])]
        enc = tokenizer(texts, return_attention_mask=False, verbose=False)
        pairs = []
        for ids in enc["input_ids"]:
            arr = np.asarray(ids, dtype=np.int64)
            pairs.append((arr, arr.copy()))

    advantages = rows.get("advantage")
    docs: list[TokenizedDoc] = []
    for i, (ids, labels) in enumerate(pairs):
        if max_length is not None and len(ids) > max_length:
            if not cfg.truncation:
                raise BadInputError(
                    f"{_row_name(i, row_ids)} has {len(ids)} tokens, more than the maximum "
                    f"{max_length}; pass --truncation to cut long documents"
                )
            ids, labels = ids[:max_length], labels[:max_length]
        adv = 1.0 if advantages is None else float(advantages[i])
        docs.append(TokenizedDoc(input_ids=ids, labels=labels, advantage=adv))
    return docs


def _apply_format_template(
    rows: dict[str, list], cfg: DataConfig, row_ids: Sequence[int] | None
) -> tuple[dict[str, list], DataConfig]:
    """``--format_template``: rows rendered to ``text`` (or ``prompt`` + ``completion``)
    and the config that tokenizes them as plain text (or as a prompt/completion pair)."""
    import dataclasses

    from bergson_ray.data.templates import load_template

    template = load_template(cfg.format_template)
    out: dict[str, list] = template.render(
        {k: v for k, v in rows.items() if k != "advantage"}, row_ids
    )
    if "advantage" in rows:
        out["advantage"] = rows["advantage"]
    tokenize_cfg = dataclasses.replace(
        cfg,
        prompt_column="prompt" if template.has_target else "text",
        completion_column="completion" if template.has_target else "",
        conversation_column="",
        reward_column="",
        advantage_column="",
        format_template="",
    )
    return out, tokenize_cfg


def estimate_advantages(prompts: list, rewards: list[float], skip_nan: bool) -> np.ndarray:
    """Dr. GRPO advantages: each reward minus the mean reward of its prompt group.

    No standard-deviation scaling (that is the "Dr." fix). A NaN (or missing) reward is an
    error unless ``skip_nan``; then that row's advantage is NaN (for the caller to drop)
    and it is left out of its group's mean.
    """
    if len(prompts) != len(rewards):
        raise BadInputError(f"{len(prompts)} prompts but {len(rewards)} rewards")
    r = np.array([np.nan if x is None else x for x in rewards], dtype=np.float64)
    bad = np.flatnonzero(np.isnan(r))
    if bad.size and not skip_nan:
        raise BadInputError(
            f"{bad.size} reward(s) are NaN or missing (rows {bad[:10].tolist()}"
            f"{' ...' if bad.size > 10 else ''}); pass --skip_nan_rewards to drop them"
        )
    if not len(prompts):
        return np.zeros(0)
    group_of: dict[Any, int] = {}
    groups = np.array(
        [group_of.setdefault(_hashable(p), len(group_of)) for p in prompts], dtype=np.int64
    )
    ok = ~np.isnan(r)
    sums = np.bincount(groups[ok], weights=r[ok], minlength=len(group_of))
    counts = np.bincount(groups[ok], minlength=len(group_of))
    means = np.divide(sums, counts, out=np.full(len(group_of), np.nan), where=counts > 0)
    return r - means[groups]


def _hashable(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        import json

        return json.dumps(value, sort_keys=True, default=str)
