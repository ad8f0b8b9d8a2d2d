"""Exceptions with messages meant for the person at the terminal.

Everything the user can get wrong (paths, columns, dimensions, flags) raises a
subclass of :class:`BergsonRayError`; the CLI prints its message without a
traceback. Ray wraps exceptions raised inside actors; :func:`unwrap` digs the
original one back out so the user never sees Ray's plumbing.
"""

from __future__ import annotations

import re


class BergsonRayError(Exception):
    """Base class: a problem the user can fix, described in plain words."""


class BadInputError(BergsonRayError, ValueError):
    """Invalid dataset, model, option combination or argument."""


class StoreError(BergsonRayError):
    """A gradient/score/Hessian directory is missing, incomplete or corrupt."""


class RunExistsError(BergsonRayError, FileExistsError):
    """The run directory exists and neither ``--overwrite`` nor ``--resume`` was given."""


def unwrap(exc: BaseException) -> BaseException:
    """The innermost :class:`BergsonRayError` in ``exc``'s cause chain, else ``exc``.

    Ray re-raises a remote failure as ``RayTaskError(<original class>)``, which *is* an
    instance of the original class but whose message is the remote traceback; the
    original exception is its ``cause``. Following causes to the deepest user error
    gives back the one-sentence message.
    """
    seen: set[int] = set()
    found: BaseException | None = None
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, BergsonRayError):
            found = cur
        nxt = None
        for attr in ("cause", "__cause__", "__context__"):
            cand = getattr(cur, attr, None)
            if isinstance(cand, BaseException):
                nxt = cand
                break
        cur = nxt
    return found if found is not None else exc


def encode_error(err: BergsonRayError) -> str:
    """``"ClassName: message"``: how a worker reports a user error through Ray Data."""
    return f"{type(err).__name__}: {err}"


def decode_error(text: str) -> BergsonRayError:
    name, _, message = str(text).partition(": ")
    classes = {c.__name__: c for c in (BadInputError, StoreError, RunExistsError, BergsonRayError)}
    return classes.get(name, BergsonRayError)(message)


def one_line(err: BaseException) -> str:
    """The user-facing sentence of ``err``: its message, or, when a Ray wrapper made the
    message a remote traceback, the last line of it without the exception's class name."""
    msg = str(err).strip()
    if "\n" not in msg or not any(m in msg for m in ("Traceback", "ray::", 'File "')):
        return msg
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    return re.sub(r"^(?:[\w.]+\.)?\w*(?:Error|Exception)(?:\([^)]*\))?: ", "", last)


def load_error(what: str, name: str, err: BaseException) -> BadInputError:
    """One sentence for a model, tokenizer or config that ``from_pretrained`` could not load.

    transformers answers with a paragraph (and safetensors with a parser error); what the
    user needs is which of three things happened: nothing can be downloaded here, the
    name does not exist, or a local file is damaged.
    """
    import os

    text = " ".join(str(err).split())
    if type(err).__name__ == "SafetensorError" or "safetensors" in text.lower() and "header" in text:
        return BadInputError(f"{what} {name!r}: a .safetensors file is damaged or truncated ({text[:120]})")
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if offline or "offline" in text.lower() or "couldn't connect" in text.lower():
        return BadInputError(
            f"{what} {name!r} is not a local directory and nothing can be downloaded here "
            "(offline); pass the path of a local copy"
        )
    if "is not a local folder and is not a valid model identifier" in text or "404" in text:
        return BadInputError(f"{what} {name!r} is neither a local directory nor a model on the Hub")
    return BadInputError(f"could not load {what} {name!r}: {text[:300]}")

