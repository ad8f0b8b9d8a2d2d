"""Does our tokenization of a chat match the model's own chat template?

Conversation rows are rendered with the chat template and tokenized without adding
special tokens (``data/tokenize.py``). If a template lacks the BOS the tokenizer would
add, or the tokenizer adds one the template already has, documents get a missing or
doubled special token, and every gradient is taken on inputs the model never saw in
training. We compare against ``apply_chat_template(tokenize=True)``, the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config.sections import DataConfig
from ..data.tokenize import tokenize_rows

SAMPLE = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
]


@dataclass
class SpecialTokenCheck:
    applicable: bool
    """False when the tokenizer has no chat template (nothing to check)."""
    passed: bool
    lines: list[str] = field(default_factory=list)
    """What to print: the template, counts of BOS/EOS, the first differing position."""


def check_special_tokens(tokenizer) -> SpecialTokenCheck:
    """Compare :func:`tokenize_rows` on a sample conversation with the chat template's ids."""
    lines = [
        f"bos_token: {tokenizer.bos_token!r} (id={tokenizer.bos_token_id})",
        f"eos_token: {tokenizer.eos_token!r} (id={tokenizer.eos_token_id})",
    ]
    if not getattr(tokenizer, "chat_template", None):
        return SpecialTokenCheck(False, True, [*lines, "no chat template: nothing to check"])
    try:
        expected = tokenizer.apply_chat_template(
            SAMPLE, tokenize=True, add_generation_prompt=False, return_dict=True
        )["input_ids"]
        expected = [int(t) for t in expected]
    except Exception as err:  # noqa: BLE001 - a template that cannot render this sample
        return SpecialTokenCheck(False, True, [*lines, f"chat template did not render: {err}"])
    try:
        doc = tokenize_rows(
            {"conversation": [SAMPLE]}, tokenizer,
            DataConfig(conversation_column="conversation"), None,
        )[0]
    except Exception as err:  # noqa: BLE001 - report any failure as the check's result
        return SpecialTokenCheck(True, False, [*lines, f"FAIL: tokenizing raised {type(err).__name__}: {err}"])
    actual = [int(t) for t in doc.input_ids]
    rendered = tokenizer.apply_chat_template(SAMPLE, tokenize=False)
    lines.append(f"template (first 200 chars): {rendered[:200]!r}")
    if actual == expected:
        return SpecialTokenCheck(True, True, [*lines, "PASS: our tokens match apply_chat_template"])
    lines.append(f"FAIL: {len(actual)} tokens, the template gives {len(expected)}")
    seen: set[int] = set()
    for name, tid in (("BOS", tokenizer.bos_token_id), ("EOS", tokenizer.eos_token_id)):
        if tid is None or tid in seen:
            continue
        seen.add(tid)
        n_ours, n_ref = actual.count(tid), expected.count(tid)
        if n_ours != n_ref:
            kind = "DUPLICATED" if n_ours > n_ref else "MISSING"
            lines.append(f"<<< {kind} {name} (id={tid}): ours has {n_ours}, expected {n_ref}")
    k = next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b), min(len(actual), len(expected)))
    lines.append(f"first difference at position {k}")
    return SpecialTokenCheck(True, False, lines)
