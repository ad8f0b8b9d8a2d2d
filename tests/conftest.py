"""Shared fixtures. Environment is fixed here, before anything imports Ray."""

from __future__ import annotations

from bergson_ray.utils.ray_env import set_loopback_env

# --- environment (must precede `import ray`) ----------------------------------------
set_loopback_env(  # loopback only, no token auth (see utils/ray_env.py), and:
    RAY_DATA_DISABLE_PROGRESS_BARS="1",
    RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S="180",
    RAY_DEDUP_LOGS="1",
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)

import pytest  # noqa: E402
import ray  # noqa: E402
import ray.data  # noqa: E402,F401  (module-level import: a local one shadows `ray`)


# --- Ray ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (start-up costs ~5 s)."""
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            namespace="bergson_ray_tests",
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


# --- tiny default assets -------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_assets():
    from bergson_ray.defaults.tiny import ensure_tiny_assets

    return ensure_tiny_assets()
