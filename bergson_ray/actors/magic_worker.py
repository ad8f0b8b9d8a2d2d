"""MAGIC workers: a plain Ray actor per GPU (or CPU slot), and the driver-side pool that
hands each one the next query.

A score column is one full reverse pass (minutes on a real model), and its worker needs
the model, both data sets and the saved states, so set-up happens once per actor
(``__init__``) and each call computes one column. The worker writes the column itself,
atomically (``magic/engine.py: write_column``), and returns only its job id; the driver
never holds more than the ids. The pool is ``job_pool.py``'s: a dead actor costs only its
query in flight.
"""

from __future__ import annotations

import logging
from typing import Any

from ..utils.ray_env import node_id
from .job_pool import JobPool, peak_rss_mib

log = logging.getLogger(__name__)


class MagicWorker:
    """Ray actor: builds the MAGIC engine once from ``spec``, then computes columns."""

    def __init__(self, spec: Any, faults: Any = None):
        self.engine = spec.build()
        self.faults = faults
        self.jobs_done = 0
        self.node = node_id()

    def shape(self) -> Any:
        return self.engine.shape()

    def jobs(self) -> list[int]:
        return self.engine.jobs()

    def train(self) -> bool:
        """The forward run (True if it ran, False if its states were already saved)."""
        return self.engine.train_once()

    def save_outputs(self, run_path: str, save_models: bool, optimizer_state: str) -> None:
        """bergson's optional outputs of the trained model: ``retrained/base`` and
        ``optimizer.pt`` (AdamW second moments)."""
        from pathlib import Path

        from ..training import export

        final = self.engine.store.load_final()
        cfg = self.engine.recipe.cfg
        if save_models:
            export.save_model_dir(
                self.engine.model, final.params, self.engine.tokenizer,
                Path(run_path) / "retrained" / "base",
            )
        if optimizer_state != "none" and cfg.optimizer == "adamw":
            export.save_optimizer_pt(
                self.engine.model, final.opt_state, Path(run_path) / export.OPTIMIZER_PT,
                betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, eps_root=cfg.eps_root,
            )

    def peak_rss_mib(self) -> float:
        """This worker's peak resident memory (MiB), for ``summary.json``."""
        return peak_rss_mib()

    def run(self, job: int) -> int:
        """Compute score column ``job`` and write it; returns ``job``."""
        from ..magic.engine import column_path, write_column

        values = self.engine.column(job)
        self.jobs_done += 1
        if self.faults is not None:
            # crash seam: after the work, before the column exists (the job is lost)
            self.faults.after_batch(self.jobs_done, self.node)
        write_column(column_path(self.engine.spec.columns, job), values)
        return job


def MagicPool(
    spec: Any, size: int, *, num_cpus: float, num_gpus: float, faults=None, local=False
) -> JobPool:
    """``size`` :class:`MagicWorker` actors (``local``: one, in this process); a job is a
    query index (one score column)."""
    return JobPool(MagicWorker, spec, size, num_cpus=num_cpus, num_gpus=num_gpus,
                   faults=faults, what="query", local=local)
