"""Silence library chatter that is not the user's business (one place to change it)."""

from __future__ import annotations


def quiet_model_loading() -> None:
    """No "Loading weights" bar from transformers: every actor loads a model, and one bar
    per actor per load floods the driver's terminal through Ray's log forwarding."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
