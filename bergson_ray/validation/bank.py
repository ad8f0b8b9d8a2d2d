"""Banks of retrained models, laid out as bergson lays them out.

A bank is a run directory holding ``subsets.json`` (row ``i`` = the documents left out of
model ``i``), ``retrained/base`` (trained on everything) and ``retrained/subset_<i>``, each
a Hugging Face model directory (``config.json``, ``model.safetensors``, tokenizer). bergson
writes this with ``validate --save_models true`` and reads it with ``--subsets bank``; we
write and read the same layout, so either tool can evaluate the other's bank.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import BadInputError
from .subsets import SUBSETS_JSON, load_subsets, same_subsets

RETRAINED = "retrained"


def model_dir(bank: str | Path, key: str) -> Path:
    """``retrained/base`` or ``retrained/subset_<i>`` (``key`` = ``base``/``subset_<i>``)."""
    return Path(bank) / RETRAINED / key


def has_model(bank: str | Path, key: str) -> bool:
    """A finished model dir has its config and weights (we move it into place whole)."""
    d = model_dir(bank, key)
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def commit_model_dir(tmp: Path, final: Path) -> None:
    """Move a fully written model directory into place (replacing a stale one)."""
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)


def read_banks(paths: list[str], requested: list[np.ndarray] | None) -> list[np.ndarray]:
    """The subsets shared by every bank in ``paths``.

    Each bank needs ``subsets.json`` and ``retrained/``; every bank must list the same
    subsets, and so must ``requested`` (a ``--manifest``) when given, or the averaged
    losses would mix models trained without different documents.
    """
    if not paths:
        raise BadInputError("--subsets bank needs --paths DIR[,DIR...] of saved banks")
    first: list[np.ndarray] | None = requested
    origin = "--manifest"
    for p in paths:
        bank = Path(p)
        if not (bank / SUBSETS_JSON).is_file() or not (bank / RETRAINED).is_dir():
            raise BadInputError(
                f"{bank} is not a bank: it needs subsets.json and retrained/ "
                "(written by validate --save_models true)"
            )
        subsets = load_subsets(bank / SUBSETS_JSON)
        if first is None:
            first, origin = subsets, str(bank)
        elif not same_subsets(subsets, first):
            raise BadInputError(
                f"bank {bank}'s subsets.json disagrees with the subsets of {origin}; "
                "banks can only be combined when they leave out the same documents"
            )
        missing = [i for i in range(len(subsets)) if not has_model(bank, f"subset_{i}")]
        if missing:
            raise BadInputError(
                f"bank {bank} lacks retrained/subset_{missing[0]} "
                f"({len(missing)} of {len(subsets)} models missing)"
            )
    assert first is not None
    return first
