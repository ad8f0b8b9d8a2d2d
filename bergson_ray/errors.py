"""Exceptions with messages meant for the person at the terminal.

Everything the user can get wrong (paths, columns, dimensions, flags) raises a
subclass of :class:`BergsonRayError`; the CLI prints its message without a
traceback. Ray wraps exceptions raised inside actors; :func:`unwrap` digs the
original one back out so the user never sees Ray's plumbing.
"""

from __future__ import annotations


class BergsonRayError(Exception):
    """Base class: a problem the user can fix, described in plain words."""


class BadInputError(BergsonRayError, ValueError):
    """Invalid dataset, model, option combination or argument."""


class StoreError(BergsonRayError):
    """A gradient/score/Hessian directory is missing, incomplete or corrupt."""


class RunExistsError(BergsonRayError, FileExistsError):
    """The run directory exists and neither ``--overwrite`` nor ``--resume`` was given."""


def unwrap(exc: BaseException) -> BaseException:
    """Return the first :class:`BergsonRayError` in ``exc``'s cause chain, else ``exc``.

    Ray re-raises task failures as ``RayTaskError`` subclasses whose ``cause`` (or
    ``__cause__``) is the original exception; Ray Data may wrap that again.
    """
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, BergsonRayError):
            return cur
        for attr in ("cause", "__cause__", "__context__"):
            nxt = getattr(cur, attr, None)
            if isinstance(nxt, BaseException):
                stack.append(nxt)
    return exc


def encode_error(err: BergsonRayError) -> str:
    """``"ClassName: message"``: how a worker reports a user error through Ray Data."""
    return f"{type(err).__name__}: {err}"


def decode_error(text: str) -> BergsonRayError:
    name, _, message = str(text).partition(": ")
    classes = {c.__name__: c for c in (BadInputError, StoreError, RunExistsError, BergsonRayError)}
    return classes.get(name, BergsonRayError)(message)
