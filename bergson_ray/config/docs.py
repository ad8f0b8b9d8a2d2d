"""Each config field's one-line description, read from the string literal under it.

The string under a dataclass field is where a reader of the code looks for what the
field means; reading ``--help`` from the same place keeps the two from drifting apart.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field name: first sentence of its docstring}`` for ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(source)
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def class_doc(cls: type) -> str:
    """First line of a class docstring (a section's title in ``--help``)."""
    doc = inspect.getdoc(cls) or ""
    return doc.splitlines()[0] if doc else cls.__name__
