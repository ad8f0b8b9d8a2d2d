"""Every command's configuration, in one place.

* ``sections.py`` — the sections commands are made of (data, model, gradients, batching,
  preprocessing, scoring, Ray), with bergson's field names and defaults;
* ``hessian.py`` / ``query.py`` — the Hessian section and the query-service configs;
* ``commands.py`` — one config per command, with the checks that span sections;
* ``coerce.py`` — the one way a config is made from flags, YAML, dicts or keywords;
* ``docs.py`` — each field's ``--help`` line, read from the string under it;


Configs validate themselves in ``__post_init__``: making one is checking it.
"""

from .coerce import as_config, from_dict
from .commands import BuildConfig, EkfacRunConfig, HessianRunConfig, ScoreRunConfig
from .hessian import FACTORED_METHODS, HessianConfig
from .query import BUILD_FIELDS, FaissConfig, ServeConfig, is_shard_name, shard_actor_name
from .sections import (
    TINY,
    AttentionConfig,
    BatchConfig,
    DataConfig,
    GradientConfig,
    IndexModelConfig,
    ModelConfig,
    Precision,
    PreprocessConfig,
    RayConfig,
    RunConfig,
    ScoreConfig,
)

__all__ = [
    "BUILD_FIELDS",
    "FACTORED_METHODS",
    "TINY",
    "AttentionConfig",
    "BatchConfig",
    "BuildConfig",
    "DataConfig",
    "EkfacRunConfig",
    "FaissConfig",
    "GradientConfig",
    "HessianConfig",
    "HessianRunConfig",
    "IndexModelConfig",
    "ModelConfig",
    "Precision",
    "PreprocessConfig",
    "RayConfig",
    "RunConfig",
    "ScoreConfig",
    "ScoreRunConfig",
    "ServeConfig",
    "as_config",
    "from_dict",
    "is_shard_name",
    "shard_actor_name",
]
