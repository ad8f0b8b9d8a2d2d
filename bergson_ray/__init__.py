"""bergson_ray: Ray-distributed data attribution for language models.

The public API is re-exported lazily so that ``import bergson_ray`` does not pull in
torch, transformers or Ray until a function that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "build": "bergson_ray.pipelines.build:build",
    "reduce": "bergson_ray.pipelines.reduce:reduce",
    "score": "bergson_ray.pipelines.score:score",
    "hessian": "bergson_ray.pipelines.hessian:hessian",
    "ekfac": "bergson_ray.pipelines.ekfac:ekfac",
    "train": "bergson_ray.pipelines.train:train",
    "validate": "bergson_ray.pipelines.validate:validate",
    "metasmoothness": "bergson_ray.pipelines.metasmoothness:metasmoothness",
    "magic": "bergson_ray.pipelines.magic:magic",
    "trackstar": "bergson_ray.pipelines.trackstar:trackstar",
    "trak": "bergson_ray.pipelines.trak:trak",
    "approxunrolling": "bergson_ray.pipelines.approxunrolling:approxunrolling",
    "mix": "bergson_ray.pipelines.mix:mix",
    "connect": "bergson_ray.query.client:connect",
    "Attributor": "bergson_ray.query.attributor:Attributor",
    "GradientStore": "bergson_ray.store.gradient_store:GradientStore",
    "ScoreStore": "bergson_ray.store.score_store:ScoreStore",
    "GradientEngine": "bergson_ray.gradients.engine:GradientEngine",
    "GradientCollectorCallback": "bergson_ray.integrations.hf_callback:GradientCollectorCallback",
    "prepare_for_gradient_collection": (
        "bergson_ray.integrations.collator:prepare_for_gradient_collection"
    ),
}


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'bergson_ray' has no attribute {name!r}")
    mod, attr = target.split(":")
    return getattr(importlib.import_module(mod), attr)


__all__ = sorted(_EXPORTS)
