"""``init_ray``: which cluster a command joins (no Ray is started here)."""

from __future__ import annotations

import ray

from bergson_ray.utils import ray_env


def _capture(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    return calls


def test_empty_ray_address_means_a_local_ray(monkeypatch):
    calls = _capture(monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", "  ")
    ray_env.init_ray(None)
    assert calls[0]["address"] is None and calls[0]["include_dashboard"] is False
    import os

    assert "RAY_ADDRESS" not in os.environ


def test_explicit_address_wins_over_the_environment(monkeypatch):
    calls = _capture(monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6399")
    ray_env.init_ray("auto")
    assert calls[0]["address"] == "auto" and "include_dashboard" not in calls[0]
    calls.clear()
    ray_env.init_ray(None)
    assert calls[0]["address"] == "127.0.0.1:6399"
