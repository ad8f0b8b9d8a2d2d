"""TRAK's members (one per model) and their steps' bookkeeping: planning, the settings
each member records in ``member.json`` (``--resume`` refuses other settings), which finished
step to reuse, and the atomic write of a step computed on the driver.

The steps themselves are ``pipelines/trak.py``; the scores ``pipelines/trak_scores.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..config import GradientConfig, ModelConfig, RunConfig
from ..config.trak import TrakRunConfig
from ..errors import BadInputError
from ..store.config_yaml import dotted_leaves

log = logging.getLogger(__name__)

STEPS = ("train", "train_probs", "train_hessian", "query", "scores")
SUMMARY = "trak.json"
"""What the last invocation did per member: steps run and reused (for people and tests)."""
MEMBER_JSON = "member.json"
WEIGHTS_NPY, SCALE_NPY = "trak_weights.npy", "trak_scale.npy"
PROBS_NPY = "probs.npy"
CHUNK_ROWS = 16384
"""Store rows read at once on the driver (Gram and scores)."""
_CONFIG_NOISE = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype"}


@dataclass
class Member:
    """One model of the run and where its steps go."""

    root: Path
    model: ModelConfig
    grad: GradientConfig
    index: int | None = None
    """Position in --checkpoints; None for a lone --model."""
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)

    def path(self, step: str) -> Path:
        return self.root / step


# ----------------------------------------------------------------------------- planning
def _architecture(model: ModelConfig) -> dict:
    from .stages import model_config

    return {k: v for k, v in model_config(model).to_dict().items() if k not in _CONFIG_NOISE}


def plan_members(cfg: TrakRunConfig) -> list[Member]:
    """The members, each with its model and projection seed; checkpoints of different
    architectures are refused (their gradients would not live in one space)."""
    root = Path(cfg.run.run_path)
    if not cfg.checkpoints:
        return [Member(root, cfg.model, cfg.grad)]
    base = _architecture(dataclasses.replace(cfg.model, model=cfg.checkpoints[0]))
    for ckpt in cfg.checkpoints[1:]:
        other = _architecture(dataclasses.replace(cfg.model, model=ckpt))
        differ = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
        if differ:
            shown = ", ".join(f"{k}={base.get(k)!r} vs {other.get(k)!r}" for k in differ[:3])
            raise BadInputError(
                f"--checkpoints {cfg.checkpoints[0]!r} and {ckpt!r} have different "
                f"architectures ({shown}); TRAK ensembles checkpoints of one model"
            )
    seed0 = cfg.grad.projection_seed or 0
    return [
        Member(
            root / f"checkpoint_{i}",
            dataclasses.replace(cfg.model, model=ckpt),
            dataclasses.replace(cfg.grad, projection_seed=seed0 + i),
            index=i,
        )
        for i, ckpt in enumerate(cfg.checkpoints)
    ]


def _fingerprint(cfg: TrakRunConfig, m: Member) -> dict:
    """Everything that shapes a member's results (not where or how wide it runs)."""
    score = dataclasses.replace(cfg.score, top_k=0, bottom_k=0, query_batch_size=None)
    body = {
        "model": m.model, "grad": m.grad, "data": cfg.data, "query": cfg.query,
        "batch": cfg.batch, "preprocess": cfg.preprocess, "score": score,
        "stats_sample_size": cfg.stats_sample_size or None,
        "skip_short_docs": cfg.skip_short_docs,
    }  # fmt: skip
    return json.loads(json.dumps({k: _plain(v) for k, v in body.items()}))


def _plain(v):
    return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v


def check_member_settings(cfg: TrakRunConfig, m: Member) -> None:
    """Refuse to resume a member made with other settings; record them otherwise."""
    now = _fingerprint(cfg, m)
    path = m.root / MEMBER_JSON
    if path.is_file() and cfg.run.resume and not cfg.run.overwrite:
        before, after = dotted_leaves(json.loads(path.read_text())), dotted_leaves(now)
        # keys only one side knows are settings another version added: not a difference
        diffs = [k for k in sorted(set(before) & set(after)) if before[k] != after[k]]
        if diffs:
            raise BadInputError(
                f"--resume: {m.root} was computed with other settings ({', '.join(diffs[:3])}); "
                "rerun with the same settings, or pass --overwrite to compute it again"
            )
    m.root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=2) + "\n")


# -------------------------------------------------------------------------------- steps
class Steps:
    """Which step of a member to reuse under --resume, and the sub-run of one to compute."""

    def __init__(self, cfg: TrakRunConfig, m: Member):
        self.resume = cfg.run.resume and not cfg.run.overwrite
        self.m = m

    def done(self, name: str, after: tuple[str, ...] = ()) -> bool:
        if self.resume and self.m.path(name).is_dir() and not any(d in self.m.ran for d in after):
            log.info("trak: reusing finished step %s", self.m.path(name))
            self.m.reused.append(name)
            return True
        self.m.ran.append(name)
        return False

    def run_config(self, name: str) -> RunConfig:
        """Replace a stale result; continue an unfinished one under --resume."""
        stale = self.m.path(name).exists()
        return RunConfig(
            run_path=str(self.m.path(name)), overwrite=True, resume=self.resume and not stale
        )


def fresh_part(final: Path) -> Path:
    part = final.with_name(final.name + ".part")
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    return part


def commit_part(part: Path, final: Path) -> Path:
    if final.exists():
        shutil.rmtree(final)
    os.replace(part, final)
    return final
