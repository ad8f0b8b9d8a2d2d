"""``approxunrolling``'s plan and run directory: every check that needs no Ray (checkpoints,
architectures, segments, learning rates, optimizer states, datasets) made once into a
:class:`Plan`, and :class:`Steps`, which pieces of ``RUN_PATH`` to reuse under
``--resume`` and their atomic writes. The pieces and the command: ``approxunrolling.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config.approxunrolling import ApproxUnrollingRunConfig
from ..errors import BadInputError, RunExistsError
from ..hessians.specs import ModuleSpec
from ..unrolling import checkpoints as ck
from ..unrolling.segments import (
    lr_times_steps,
    lr_times_steps_from_lists,
    segment_boundaries,
    segment_indices,
    step_to_lr,
)
from .stages import count_rows

log = logging.getLogger(__name__)

COMMAND = "approxunrolling"
SUMMARY = "approxunrolling.json"
CONFIG_YAML = "config.yaml"


@dataclass
class Plan:
    """Everything checked and decided before Ray starts."""

    checkpoints: list[ck.Checkpoint]
    hf_dirs: list[Path]
    groups: list[list[int]]
    lr_times_steps: list[float]
    momentum: float
    record: ck.TrainingRecord | None
    base_model: str
    num_docs: int
    num_queries: int | None
    specs: dict[str, ModuleSpec]
    params: dict[str, tuple[str, str | None, bool]]
    """module -> (weight parameter, bias parameter or None, Conv1D layout)."""
    layout: dict[str, int]
    """Query store columns: module -> full gradient width (the engine's order)."""

    def segment_of(self, c: int) -> tuple[int, int]:
        for sg, group in enumerate(self.groups):
            if c in group:
                return sg, group.index(c)
        raise IndexError(c)


# ------------------------------------------------------------------------------ planning


def _lr_times_steps(cfg: ApproxUnrollingRunConfig, ckpts: list[ck.Checkpoint], momentum: float) -> list[float]:
    if cfg.lr_list:
        return lr_times_steps_from_lists(cfg.lr_list, cfg.step_size_list, momentum)
    unnamed = [c.source for c in ckpts if c.step is None]
    if unnamed:
        raise BadInputError(
            f"cannot tell the training step of checkpoint {unnamed[0]} from its name (expected "
            "checkpoint-<N>, step_<N>[.ckpt] or <N>); pass --lr_list and --step_size_list"
        )
    history = ck.read_log_history(ckpts)
    if history is None:
        raise BadInputError(
            "no learning-rate history found for these checkpoints (log_history.json of their "
            "training run, or trainer_state.json); pass --lr_list and --step_size_list"
        )
    bounds = segment_boundaries([int(c.step) for c in ckpts], cfg.segments)  # type: ignore[arg-type]
    return lr_times_steps(bounds, step_to_lr(history), momentum)


def _module_plan(model: str, cfg: ApproxUnrollingRunConfig):
    """Target modules of the architecture: specs, their parameters (Adam grids), and the
    gradient row layout."""
    from ..gradients.modules import find_target_modules
    from ..hessians.fitter import module_specs
    from .stages import meta_model, plan_layout

    model_cfg = dataclasses.replace(cfg.model, model=model)
    meta = meta_model(model_cfg)
    specs = module_specs(meta, cfg.grad)
    full = {id(m): n for n, m in meta.named_modules()}
    params = {}
    for name, mod in find_target_modules(meta, cfg.grad).items():
        prefix = full[id(mod)]
        bias = f"{prefix}.bias" if specs[name].bias else None
        params[name] = (f"{prefix}.weight", bias, type(mod).__name__ == "Conv1D")
    if not specs:
        raise BadInputError("no target modules: check --modules / --filter_modules")
    layout = plan_layout(model_cfg, cfg.grad).grad_sizes
    if set(layout) != set(specs):
        raise BadInputError("gradient modules differ from the Hessian's; drop --split_attention_modules")
    return specs, params, dict(layout)


def plan_run(cfg: ApproxUnrollingRunConfig, root: Path) -> Plan:
    """Every check that needs no Ray: checkpoints, architectures, segments, learning
    rates, optimizer states, datasets. One sentence for the first problem found."""
    ckpts = ck.find_checkpoints(cfg.checkpoints)
    groups = segment_indices(len(ckpts), cfg.segments)
    record = ck.read_training_record(ckpts[0].train_run)
    shapes = [ck.parameter_shapes(c) for c in ckpts]
    ck.check_same_architecture(ckpts, shapes)
    if any(c.train_state for c in ckpts):
        steps = [c.step for c in ckpts if c.train_state]
        if len(set(steps)) != len(steps):
            raise BadInputError("the same training step is listed twice in --checkpoints")
    base = cfg.model_path or (record.model if record and record.model else None) or cfg.model.model
    hf_dirs = [
        root / "exported" / f"checkpoint-{c.step}" if c.train_state else c.source for c in ckpts
    ]
    momentum = cfg.momentum if cfg.momentum is not None else ck.derive_momentum(record)
    lrs = _lr_times_steps(cfg, ckpts, momentum)
    if record is not None and record.optimizer == "adamw" and not cfg.use_adam_preconditioner:
        log.warning(
            "approxunrolling: the run trained with adamw but --use_adam_preconditioner is off; "
            "scores use the SGD variant"
        )
    if cfg.use_adam_preconditioner:
        for c in ckpts:
            if not ck.has_second_moments(c, record):
                raise BadInputError(
                    f"--use_adam_preconditioner needs the Adam second moments of checkpoint "
                    f"{c.source}: it has no optimizer.pt and is not an AdamW state of `bergson-ray train`"
                )
    specs, params, layout = _module_plan(base if ckpts[0].train_state else str(ckpts[0].source), cfg)
    num_docs = count_rows(cfg.data, "training set")
    num_queries = None if cfg.query_path else count_rows(cfg.query, "query set")
    return Plan(ckpts, hf_dirs, groups, lrs, float(momentum), record, base, num_docs,
                num_queries, specs, params, layout)  # fmt: skip


# ------------------------------------------------------------------------------ the run dir


class Steps:
    """Which pieces exist, which to (re)compute, and atomic writes of each piece."""

    def __init__(self, root: Path, cfg: ApproxUnrollingRunConfig):
        self.root = root
        self.resume = cfg.run.resume
        self.ran: list[str] = []
        self.reused: list[str] = []
        ours = self.entries()
        if ours and not (cfg.run.resume or cfg.run.overwrite):
            raise RunExistsError(
                f"{root} already holds an approxunrolling run ({', '.join(p.name for p in ours[:3])}); "
                "pass --resume to reuse its finished pieces or --overwrite to compute them again"
            )
        if cfg.run.overwrite:
            for p in ours:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif cfg.run.resume and (root / CONFIG_YAML).is_file():
            from ..store.config_yaml import check_resume_settings

            check_resume_settings(root, COMMAND, cfg)

    def entries(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        names = ("exported", "query", "scores", SUMMARY, CONFIG_YAML)
        return sorted(
            p for p in self.root.iterdir()
            if p.name.split(".part")[0] in names or p.name.startswith("segment_")
        )

    def reuse(self, name: str, after: tuple[str, ...] | list[str] = ()) -> bool:
        """A finished piece is reused under --resume unless one it is made from was just
        recomputed; otherwise it is recorded as (re)computed."""
        if self.resume and (self.root / name).exists() and not any(d in self.ran for d in after):
            self.reused.append(name)
            return True
        self.ran.append(name)
        return False

    def part(self, name: str) -> Path:
        """A fresh ``<name>.part`` directory to write the piece into."""
        part = self.root / f"{name}.part"
        if part.exists():
            shutil.rmtree(part)
        part.mkdir(parents=True)
        return part

    def commit(self, name: str) -> Path:
        final = self.root / name
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(self.root / f"{name}.part", final)
        return final


def seg_dir(sg: int, method: str = "") -> str:
    return f"segment_{sg}/{method}" if method else f"segment_{sg}"


def ckpt_dir(plan: Plan, c: int, method: str) -> str:
    sg, i = plan.segment_of(c)
    return f"segment_{sg}/ckpt_{i}/{method}"
