"""``--format_template``: Jinja2 templates that turn a dataset row into text.

For datasets without a text column (multiple-choice QA, structured records), a YAML
file in the style of lm-evaluation-harness says how to write each row (bergson's
``DataConfig.format_template``):

* ``doc_to_text`` (required): a template of the prompt, e.g. ``"{{question}}\\nAnswer:"``;
* ``doc_to_target`` (optional): a column name, or a template, giving the target;
* ``doc_to_choice`` (optional): a list of strings; the target is then an index into it.

Without a target every token of the rendered text carries loss (plain text). With one,
the row becomes a prompt/completion pair, rendered with the tokenizer's chat template as
a user/assistant exchange, and only the completion carries loss: the prompt's labels are
``-100`` (``data/tokenize.py``). Other keys of the file are ignored, so an lm-eval task
file can be used as is.

Why a sandbox: a template is user input, and plain Jinja2 lets a template walk from any
value to Python internals (``''.__class__.__mro__`` ...). Templates here are rendered by
:class:`jinja2.sandbox.SandboxedEnvironment`, and any access it deems unsafe stops the run
with one sentence instead of rendering an empty string. The YAML is read with
``yaml.safe_load``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bergson_ray.errors import BadInputError

BUILTIN_TEMPLATES: dict[str, dict[str, Any]] = {
    "mcqa": {
        # four-option multiple choice in MMLU's layout (cais/mmlu, cais/wmdp):
        # columns question (str), choices (list of 4 str), answer (int index)
        "doc_to_text": (
            "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
            "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
        ),
        "doc_to_target": "answer",
        "doc_to_choice": ["A", "B", "C", "D"],
    },
}
"""Templates known by name (``--format_template mcqa``) besides YAML files; ``mcqa``
formats rows like bergson's shipped ``bergson/templates/mcqa.yaml``."""


def _environment():
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import SandboxedEnvironment

    class StrictSandbox(SandboxedEnvironment):
        """A sandbox that refuses unsafe attribute access at once (the stock one returns
        an undefined value, which renders as an empty string until used further)."""

        def unsafe_undefined(self, obj: Any, attribute: str):
            raise SecurityError(
                f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed"
            )

    return StrictSandbox(autoescape=False, keep_trailing_newline=True)


def _is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


@dataclass(frozen=True)
class FormatTemplate:
    """A parsed, compiled format template."""

    doc_to_text: str
    doc_to_target: str | None
    doc_to_choice: tuple[str, ...] | None
    source: str
    """The file (or built-in name) it came from, for messages."""

    @property
    def has_target(self) -> bool:
        return self.doc_to_target is not None

    @functools.cached_property
    def _env(self):
        return _environment()

    @functools.cached_property
    def _compiled(self):
        from jinja2.exceptions import TemplateSyntaxError

        out = {}
        for key in ("doc_to_text", "doc_to_target"):
            text = getattr(self, key)
            if text is None or (key == "doc_to_target" and not _is_template(text)):
                continue
            try:
                out[key] = self._env.from_string(text)
            except TemplateSyntaxError as err:
                raise BadInputError(
                    f"format template {self.source}: {key} is not valid Jinja2 "
                    f"(line {err.lineno}: {err.message})"
                ) from None
        return out

    def columns(self) -> list[str]:
        """Dataset columns the template reads (its free variables, bar Jinja's globals)."""
        from jinja2 import meta

        names: set[str] = set()
        for key in ("doc_to_text", "doc_to_target"):
            text = getattr(self, key)
            if text is None:
                continue
            if key == "doc_to_target" and not _is_template(text):
                names.add(text)
                continue
            _ = self._compiled  # syntax errors as one sentence first
            names |= meta.find_undeclared_variables(self._env.parse(text))
        return sorted(names - set(self._env.globals))

    def _render(self, key: str, row: dict[str, Any], where: str) -> str:
        from jinja2.exceptions import SecurityError, TemplateError

        try:
            return self._compiled[key].render(**row)
        except SecurityError as err:
            raise BadInputError(
                f"format template {self.source} was refused by the sandbox ({err}): "
                "templates may only read the row's values"
            ) from None
        except TemplateError as err:
            raise BadInputError(f"{where}: format template {key} failed: {err}") from None

    def render_row(self, row: dict[str, Any], where: str) -> tuple[str, str | None]:
        """``(prompt, target)`` of one row (``target`` is None without ``doc_to_target``)."""
        prompt = self._render("doc_to_text", row, where)
        if self.doc_to_target is None:
            return prompt, None
        if _is_template(self.doc_to_target):
            target: Any = self._render("doc_to_target", row, where)
        else:
            target = row[self.doc_to_target]
        if self.doc_to_choice is not None:
            try:
                k = int(str(target).strip())
            except ValueError:
                raise BadInputError(
                    f"{where}: doc_to_target gave {target!r}, not an index into doc_to_choice"
                ) from None
            if not 0 <= k < len(self.doc_to_choice):
                raise BadInputError(
                    f"{where}: doc_to_target gave {k}, outside doc_to_choice's "
                    f"{len(self.doc_to_choice)} choices"
                )
            target = self.doc_to_choice[k]
        return prompt, str(target)

    def render(
        self, rows: dict[str, list], row_ids: Sequence[int] | None = None
    ) -> dict[str, list[str]]:
        """Columns of a batch -> ``{"text"}`` (no target) or ``{"prompt", "completion"}``."""
        n = len(next(iter(rows.values()))) if rows else 0
        keys = list(rows)
        prompts, targets = [], []
        for i in range(n):
            where = f"row {row_ids[i]}" if row_ids is not None else f"row {i} of this batch"
            prompt, target = self.render_row({k: rows[k][i] for k in keys}, where)
            prompts.append(prompt)
            targets.append(target)
        if not self.has_target:
            return {"text": prompts}
        return {"prompt": prompts, "completion": targets}


def parse_template(doc: Any, source: str) -> FormatTemplate:
    """Check a template document's keys and types; one sentence for the first problem."""
    where = f"format template {source}"
    if not isinstance(doc, dict):
        raise BadInputError(f"{where} must be a YAML mapping with a doc_to_text key")
    text = doc.get("doc_to_text")
    if not isinstance(text, str) or not text:
        raise BadInputError(f"{where} needs doc_to_text, a non-empty Jinja2 template string")
    target = doc.get("doc_to_target")
    if target is not None and not (isinstance(target, str) and target):
        raise BadInputError(f"{where}: doc_to_target must be a column name or a Jinja2 template")
    choice = doc.get("doc_to_choice")
    if choice is not None:
        if not isinstance(choice, list) or not choice or not all(
            isinstance(c, (str, int, float)) for c in choice
        ):
            raise BadInputError(f"{where}: doc_to_choice must be a non-empty list of strings")
        if target is None:
            raise BadInputError(f"{where}: doc_to_choice needs a doc_to_target (the index)")
        choice = tuple(str(c) for c in choice)
    tpl = FormatTemplate(text, target, choice, source)
    _ = tpl._compiled  # syntax errors now, before any worker starts
    return tpl


@functools.lru_cache(maxsize=16)
def _load(spec: str, mtime: float | None) -> FormatTemplate:
    import yaml

    if mtime is None:
        return parse_template(BUILTIN_TEMPLATES[spec], spec)
    try:
        doc = yaml.safe_load(Path(spec).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise BadInputError(f"format template {spec} is not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"cannot read format template {spec}: {err}") from None
    return parse_template(doc, spec)


def load_template(spec: str) -> FormatTemplate:
    """The template named by ``--format_template``: a YAML file, or a built-in name."""
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        return _load(path, os.path.getmtime(path))
    if spec in BUILTIN_TEMPLATES:
        return _load(spec, None)
    raise BadInputError(
        f"format template {spec!r} does not exist (a YAML file, or one of "
        f"{sorted(BUILTIN_TEMPLATES)})"
    )
