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

try:  # module-level import: a local one shadows `ray`
    import ray
    import ray.data  # noqa: F401
except ImportError:  # e.g. benchmarks/gpu_suite.sh's CUDA tests on a machine without Ray
    ray = None


# --- Ray ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (start-up costs ~5 s)."""
    if ray is None:
        pytest.skip("ray is not installed")
    if not ray.is_initialized():
        ray.init(
            address="local",  # our own, even when a `ray start` head runs on this machine
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
