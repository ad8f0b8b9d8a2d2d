"""``bergson-ray test_model_configuration``: bergson's diagnostic of gradient consistency.

Every option is a flag (nothing is written to disk), as in bergson. Exit status 0 when
some setting gives consistent gradients (the flags to add are printed), 1 when none does.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config.diagnostics import DiagnoseConfig
from .args import add_dataclass_args, build_dataclass

HELP = (
    "Check that a document's gradient is the same alone and batched (padding, batching, "
    "chat-template special tokens); print the flags that make it so"
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("test_model_configuration", help=HELP, description=HELP)
    add_dataclass_args(p, DiagnoseConfig)
    p.add_argument("--verbose", action="store_true", help="print every trial")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> DiagnoseConfig:
    return build_dataclass(DiagnoseConfig, args)


def run(args: argparse.Namespace) -> int:
    from ..diagnostics.diagnose import diagnose

    diagnosis = diagnose(config_from_args(args), verbose=bool(getattr(args, "verbose", False)))
    return 0 if diagnosis.recommended_flags is not None else 1
