"""The steps of a multi-step command (trackstar, lissa, ekfac): which step dirs under
the run dir to reuse, which to (re)compute, the sub-run config of each, and the last
step they share, scoring the training data against the preconditioned query.

A step is a run dir of its own (``RUN/<step>``, written as ``RUN/<step>.part``). Under
``--resume`` a finished step is reused unless a step it is made from was just
recomputed, or the caller knows it is stale for another reason; a stale step's result,
or its unfinished ``.part``, is replaced rather than continued.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..config import PreprocessConfig, RunConfig, ScoreConfig, ScoreRunConfig
from ..errors import RunExistsError
from ..store.files import write_json_atomic

log = logging.getLogger(__name__)


class StepRecord:
    """Which steps ran and which were reused; refuses a used run dir without
    ``--resume`` or ``--overwrite``."""

    def __init__(self, root: Path, run: RunConfig, command: str, steps: tuple[str, ...]):
        self.root = root
        self.command = command
        self.resume = run.resume
        self.overwrite = run.overwrite
        self.ran: list[str] = []
        self.reused: list[str] = []
        self.stale: set[str] = set()
        present = [s for s in steps if (root / s).exists() or (root / f"{s}.part").exists()]
        if present and not (self.resume or self.overwrite):
            raise RunExistsError(
                f"{root} already holds {command} steps ({', '.join(present)}); pass --resume "
                "to reuse the finished ones or --overwrite to compute them again"
            )

    def path(self, name: str) -> Path:
        return self.root / name

    def done(self, name: str, after: tuple[str, ...] = (), stale: bool = False) -> bool:
        """True when step ``name`` is finished and reused; otherwise it is recorded as
        (re)computed. ``after``: the steps it is made from; ``stale``: the caller's own
        reason to recompute it."""
        if stale or any(dep in self.ran for dep in after):
            self.stale.add(name)
        finished = self.path(name).is_dir()
        if finished and not self.overwrite and name not in self.stale:
            log.info("%s: reusing finished step %s", self.command, self.path(name))
            self.reused.append(name)
            return True
        if finished and name in self.stale:
            log.info("%s: recomputing %s (what it is made from changed)", self.command, name)
        self.ran.append(name)
        return False

    def run_config(self, name: str) -> RunConfig:
        """The sub-run of a step being computed: replace a finished or stale result,
        continue an unfinished one."""
        replace = self.overwrite or name in self.stale or self.path(name).is_dir()
        return RunConfig(
            run_path=str(self.path(name)), overwrite=replace, resume=self.resume and not replace
        )

    def write_summary(self, name: str, record: dict[str, Any], t0: float) -> None:
        """``RUN/<name>``: ``record`` plus the steps that ran and were reused and the
        seconds since ``t0`` (a ``time.perf_counter()``)."""
        seconds = round(time.perf_counter() - t0, 3)
        record.update(ran=self.ran, reused=self.reused, seconds=seconds)
        write_json_atomic(self.root / name, record)
        log.info("%s: done in %.1fs -> %s", self.command, seconds, self.root)


def score_step(
    cfg: Any, run: RunConfig, score: ScoreConfig, preprocess: PreprocessConfig | None = None
) -> Path:
    """The last step of a multi-step command: ``cfg``'s training data (its model, data,
    gradient, batch and Ray sections) scored against the query store ``score.query_path``.

    That query was preconditioned by an earlier step, so the training rows get no
    preprocessing unless ``preprocess`` says so (trackstar's Hessian and normalization).
    """
    from .score import score as run_score

    sub = ScoreRunConfig(
        run=run,
        model=cfg.model,
        data=cfg.data,
        grad=cfg.grad,
        batch=cfg.batch,
        preprocess=PreprocessConfig() if preprocess is None else preprocess,
        ray=cfg.ray,
        skip_short_docs=cfg.skip_short_docs,
        score=score,
    )
    return Path(run_score(sub))
