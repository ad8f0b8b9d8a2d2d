"""Config of ``test_model_configuration`` (bergson's ``DiagnoseConfig``).

Field names and meanings are bergson 2.5.1's; the defaults differ only where ours must
run offline: the tiny model and corpus instead of pythia-160m and pile-10k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .sections import TINY, require


@dataclass
class DiagnoseConfig:
    """Is a document's gradient the same alone and batched? Which flags make it so?"""

    model: str = TINY
    """Hub id or local directory of the causal LM to test, or 'tiny'."""
    dataset: str = TINY
    """Dataset to sample documents from (hub id, save_to_disk dir, data file, or 'tiny')."""
    split: str = "train"
    """Dataset split."""
    prompt_column: str = "text"
    """Column holding the documents' text."""
    n_trials: int = 100
    """Random document pairs tested per setting (and equal-length batches tested once)."""
    seed: int = 42
    """Random seed of the document pairs."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Precision you plan to run build/score/hessian with (the first setting tried)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device to test on (auto = cuda when available)."""
    max_len: int = 512
    """Truncate documents longer than this many tokens."""
    min_len: int = 4
    """Skip documents shorter than this many tokens."""
    max_documents: int = 2000
    """Documents read from the dataset (the first ones long enough); pairs are drawn among them."""
    threshold: float = 0.99
    """A trial whose gradient cosine is below this is flagged."""
    model_kwargs: str = ""
    """Extra keyword arguments for from_pretrained, as k=v,k2=v2 (e.g. trust_remote_code=true)."""

    def __post_init__(self) -> None:
        require(self.n_trials >= 1, "--n_trials must be >= 1")
        require(self.min_len >= 2, "--min_len must be >= 2 (a document needs a next token)")
        require(self.max_len >= self.min_len, "--max_len must be >= --min_len")
        require(self.max_documents >= 2, "--max_documents must be >= 2 (trials draw pairs)")
        require(-1.0 <= self.threshold <= 1.0, "--threshold is a cosine: it must be in [-1, 1]")
