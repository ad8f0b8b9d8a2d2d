"""``bergson-ray train``: train a model with bergson's trainer semantics, on one process.

Why no Ray here: a training run is one sequential chain of optimizer steps; the
parallel work (leave-k-out retraining, metasmoothness) runs many of these chains, each
in a worker calling :mod:`bergson_ray.training` directly.

Run directory (bergson 2.5.1's ``bergson train`` layout, written as ``RUN.part`` and
renamed when complete)::

    RUN/config.yaml                      # {steps: [{train: {...}}], metadata}
    RUN/model/                           # HF model dir + tokenizer (--save_models)
    RUN/optimizer.pt                     # AdamW second moments (--save_optimizer_state)
    RUN/optimizer_state.safetensors      # the same, as <param>.exp_avg_sq
    RUN/checkpoints/log_history.json     # per-step learning rate (and loss)
    RUN/checkpoints/step_<i>.ckpt/       # states of the --save_mode schedule
    RUN/summary.json
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..config import as_config
from ..config.training import TrainRunConfig
from ..training import export
from ..training.loop import train as train_params
from .stages import open_training_run

log = logging.getLogger(__name__)


def train(cfg: TrainRunConfig | dict | None = None, **overrides: object) -> str:
    """Run ``cfg`` and return the committed run directory."""
    cfg = as_config(TrainRunConfig, cfg, **overrides)
    t0 = time.time()
    run, model, tokenizer, data = open_training_run(cfg, "train")
    tc = cfg.training
    adam = tc.optimizer == "adamw"
    ckpt_dir = Path(run.path) / "checkpoints"
    hyper = {"betas": (tc.adam_beta1, tc.adam_beta2), "eps": tc.adam_eps, "eps_root": tc.eps_root}

    def on_checkpoint(step: int, params: dict, state: dict) -> None:
        d = export.save_checkpoint(ckpt_dir / f"step_{step}.ckpt", params, state)
        if adam and tc.save_optimizer_state == "all":
            export.save_optimizer_pt(model, state, d / export.OPTIMIZER_PT, step=step, **hyper)

    log.info("training on %d documents (%s, batch %d)", len(data), tc.optimizer, tc.batch_size)
    result = train_params(model, data, tc, on_checkpoint=on_checkpoint)
    export.write_log_history(result.log_history, ckpt_dir / export.LOG_HISTORY)
    moments = 0
    if adam and tc.save_optimizer_state != "none":
        moments = export.save_optimizer_pt(model, result.opt_state, Path(run.path) / export.OPTIMIZER_PT)
        export.save_second_moments(result.opt_state, Path(run.path) / export.OPTIMIZER_SAFETENSORS)
    elif tc.save_optimizer_state != "none":
        log.info("--save_optimizer_state: %s keeps no Adam second moments; none written", tc.optimizer)
    if cfg.save_models:
        export.save_model_dir(model, result.params, tokenizer, Path(run.path) / "model")
    losses = [h["loss"] for h in result.log_history]
    run.write_summary(
        {
            "documents": len(data),
            "steps": len(result.log_history),
            "checkpoints": result.checkpoints,
            "second_moments": moments,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "seconds": round(time.time() - t0, 3),
        }
    )
    return str(run.commit())
