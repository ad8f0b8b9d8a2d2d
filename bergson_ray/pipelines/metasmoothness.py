"""``bergson-ray metasmoothness``: how linearly training responds to data weights.

Writes ``RUN/metasmoothness.json`` (bergson 2.5.1's file: score, fd_step,
direction_seed, total_movement_l1), ``config.yaml`` and, with ``--save_models``, the
model trained with unit weights in ``RUN/model``. The three trainings run one after
another in this process (each is deterministic; see :mod:`bergson_ray.training`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import as_config
from ..config.training import MetasmoothnessRunConfig
from ..training import export
from ..training.metasmoothness import measure
from .stages import open_training_run

RESULT_FILE = "metasmoothness.json"


def metasmoothness(cfg: MetasmoothnessRunConfig | dict | None = None, **overrides: object) -> str:
    """Run the probe and return the committed run directory."""
    cfg = as_config(MetasmoothnessRunConfig, cfg, **overrides)
    t0 = time.time()
    run, model, tokenizer, data = open_training_run(cfg, "metasmoothness")

    def on_trained(k: int, result) -> None:
        if k == 0 and cfg.save_models:
            export.save_model_dir(model, result.params, tokenizer, Path(run.path) / "model")

    out = measure(
        model, data, cfg.training, cfg.probe.fd_step, cfg.probe.direction_seed,
        on_trained=on_trained,
    )  # fmt: skip
    (Path(run.path) / RESULT_FILE).write_text(json.dumps(out, indent=2))
    run.write_summary({**out, "documents": len(data), "seconds": round(time.time() - t0, 3)})
    return str(run.commit())
