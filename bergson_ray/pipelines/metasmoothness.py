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
from ..errors import BadInputError
from ..store.run_dir import RunDir
from ..training import export
from ..training.data import load_tokenized
from ..training.metasmoothness import measure
from ..training.model import make_model, max_model_length

RESULT_FILE = "metasmoothness.json"


def metasmoothness(cfg: MetasmoothnessRunConfig | dict | None = None, **overrides: object) -> str:
    """Run the probe and return the committed run directory."""
    cfg = as_config(MetasmoothnessRunConfig, cfg, **overrides)
    if not cfg.run.run_path:
        raise BadInputError("metasmoothness needs a run path")
    run = RunDir(cfg.run.run_path, overwrite=cfg.run.overwrite)
    t0 = time.time()
    model, tokenizer = make_model(cfg.model)
    data = load_tokenized(cfg.data, tokenizer, max_length=max_model_length(model, tokenizer))
    run.write_config(cfg, command="metasmoothness")

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
