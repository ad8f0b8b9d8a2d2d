"""A small HTML page builder: every piece of text is escaped, images are relative
file names next to ``index.html``; no JavaScript, no external stylesheet or font."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

MAX_TEXT = 800
"""Characters of a document shown in a table cell (the rest is cut, and says so)."""

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 80em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-family: monospace; }
pre { margin: 0; white-space: pre-wrap; word-break: break-word; max-width: 60em; font-size: 0.9em; }
.note { color: #666; font-style: italic; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """Numbers to a short fixed form (6 significant digits); anything else as ``str``."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def clip(text: str | None) -> tuple[str, bool]:
    if text is None:
        return "", False
    return (text[:MAX_TEXT], True) if len(text) > MAX_TEXT else (text, False)


class Cell:
    """A table cell that is not plain text: a number, or a document's text."""

    def __init__(self, body: str, cls: str = ""):
        self.body, self.cls = body, cls

    @classmethod
    def num(cls, value: Any) -> Cell:
        return cls(esc(fmt(value)), "num")

    @classmethod
    def text(cls, value: str | None) -> Cell:
        shown, cut = clip(value)
        body = f"<pre>{esc(shown)}</pre>"
        if cut:
            body += f'<span class="note">(first {MAX_TEXT} of {len(value or "")} characters)</span>'
        elif value is None:
            body = '<span class="note">(no text)</span>'
        return cls(body)


class Page:
    """Build the page top to bottom, then :meth:`render` it."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def heading(self, level: int, text: str, anchor: str = "") -> None:
        ident = f' id="{esc(anchor)}"' if anchor else ""
        self.parts.append(f"<h{level}{ident}>{esc(text)}</h{level}>")

    def para(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{esc(text)}</p>")

    def image(self, name: str, alt: str) -> None:
        self.parts.append(f'<p><img src="{esc(name)}" alt="{esc(alt)}"></p>')

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        row_attrs: Sequence[Mapping[str, Any]] | None = None,
        cls: str = "",
    ) -> None:
        """``rows`` of plain values (escaped) or :class:`Cell`; ``row_attrs`` become
        ``data-*`` attributes of each ``<tr>`` (so a reader can find rows without
        parsing the visible text)."""
        out = [f'<table class="{esc(cls)}">' if cls else "<table>"]
        if columns:
            out.append("<tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>")
        for i, row in enumerate(rows):
            attrs = "".join(
                f' data-{esc(k)}="{esc(v)}"' for k, v in (row_attrs[i] if row_attrs else {}).items()
            )
            cells = []
            for v in row:
                if isinstance(v, Cell):
                    klass = f' class="{v.cls}"' if v.cls else ""
                    cells.append(f"<td{klass}>{v.body}</td>")
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    cells.append(f'<td class="num">{esc(fmt(v))}</td>')
                else:
                    cells.append(f"<td>{esc(fmt(v))}</td>")
            out.append(f"<tr{attrs}>{''.join(cells)}</tr>")
        out.append("</table>")
        self.parts.append("\n".join(out))

    def key_values(self, items: Mapping[str, Any]) -> None:
        self.table([], [[k, v] for k, v in items.items()], cls="kv")

    def render(self) -> str:
        body = "\n".join(self.parts)
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{esc(self.title)}</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body>\n<h1>{esc(self.title)}</h1>\n{body}\n</body>\n</html>\n"
        )
