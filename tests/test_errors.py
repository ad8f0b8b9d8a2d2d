"""Loading failures as one sentence (no transformers paragraph, no parser traceback)."""

from __future__ import annotations

import shutil

import pytest

from bergson_ray.config import ModelConfig
from bergson_ray.errors import BadInputError
from bergson_ray.runners.model_loading import load_model


def test_truncated_safetensors_is_named(tmp_path, tiny_assets):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_assets.model_dir, model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BadInputError, match="damaged or truncated") as info:
        load_model(ModelConfig(str(model_dir)))
    assert "\n" not in str(info.value)


def test_a_hub_id_offline_says_nothing_can_be_downloaded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadInputError, match="nothing can be downloaded here .*local copy") as info:
        load_model(ModelConfig("no-such-org/no-such-model"))
    assert len(str(info.value)) < 200
