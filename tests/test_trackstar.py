"""``trackstar``: the pipeline against its steps run by hand, resume, and bad input.

The parity test is the definition of the command: with ``--mix_hessians false``,
TrackStar is ``hessian --method autocorrelation`` on the first ``stats_sample_size``
training rows, a query ``build`` preconditioned with it, and ``score``; the pipeline
must give those scores, not merely similar ones. It runs with ``--optimizer_state`` so
the Adam normalizer reaches every step (both Hessians, the query, the scores).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from bergson_ray.config import as_config
from bergson_ray.config.trackstar import TrackstarRunConfig
from bergson_ray.errors import BadInputError, RunExistsError

SPLIT, QUERY_SPLIT, STATS = "train[:16]", "train[:4]", 12
COMMON = dict(
    dataset="tiny",
    split=SPLIT,
    projection_dim=8,
    truncation=True,
    stats_sample_size=STATS,
    executor="process",  # build/score stages in process (tests/test_in_process.py)
    **{"query.split": QUERY_SPLIT, "query.truncation": True},
)


def _scores(path) -> np.ndarray:
    from bergson_ray.store.score_store import ScoreStore

    store = ScoreStore.open(path)
    assert store.is_complete()
    return np.asarray(store.scores, np.float32)


def _summary(root) -> dict:
    return json.loads((root / "trackstar.json").read_text())


def test_unmixed_trackstar_is_hessian_build_score(ray_session, tmp_path, tiny_assets):
    from bergson_ray.pipelines.build import build
    from bergson_ray.pipelines.hessian import hessian
    from bergson_ray.pipelines.score import score
    from bergson_ray.pipelines.trackstar import trackstar

    adam = str(tiny_assets.model_dir)  # its optimizer_state.safetensors: Adam normalizers
    out = trackstar(
        run_path=str(tmp_path / "ts"), mix_hessians=False, optimizer_state=adam, **COMMON
    )
    root = tmp_path / "ts"
    assert out == root / "scores"
    assert not (root / "query_hessian").exists() and not (root / "mixed_hessian").exists()
    assert _summary(root)["ran"] == ["value_hessian", "query", "scores"]
    for step in ("value_hessian", "query", "scores"):  # every step normalized by Adam
        assert adam in (root / step / "config.yaml").read_text()

    grad = dict(dataset="tiny", projection_dim=8, truncation=True, optimizer_state=adam, executor="process")
    h = hessian(run_path=str(tmp_path / "h"), method="autocorrelation", split="train[0:12]", **grad)
    q = build(
        run_path=str(tmp_path / "q"),
        hessian_path=str(h),
        **{**grad, "dataset": str(tiny_assets.query_dir), "split": QUERY_SPLIT},
    )
    s = score(
        run_path=str(tmp_path / "s"), query_path=str(q), hessian_path=str(h), split=SPLIT, **grad
    )
    mine, hand = _scores(out), _scores(s)
    assert mine.shape == (16, 4)
    np.testing.assert_allclose(mine, hand, rtol=1e-5, atol=1e-6)
    assert np.abs(hand).max() > 0


@pytest.fixture(scope="module")
def mixed_run(ray_session, tmp_path_factory):
    """One full mixed run shared by the tests below, which run in file order: the
    read-only ones first, then the ones that recompute steps in place (a copy would not
    do: every step's config.yaml names the Hessian by its absolute path)."""
    from bergson_ray.pipelines.trackstar import trackstar

    root = tmp_path_factory.mktemp("mixed") / "ts"
    cfg = dict(run_path=str(root), target_downweight_components=4, **COMMON)
    first = _scores(trackstar(**cfg))
    return root, cfg, first, _summary(root)


def test_mixed_trackstar_mixes_both_hessians(mixed_run):
    from bergson_ray.pipelines.trackstar import STEPS
    from bergson_ray.store.processor import load_hessians

    root, _, first, summary = mixed_run
    assert summary["ran"] == list(STEPS) and first.shape == (16, 4)
    lam = summary["mixing_coefficient"]
    assert 0.0 < lam <= 1.0
    mixed = load_hessians(root / "mixed_hessian")
    hq, ht = load_hessians(root / "query_hessian"), load_hessians(root / "value_hessian")
    for name, h in mixed.items():
        np.testing.assert_allclose(h, lam * hq[name] + (1 - lam) * ht[name], rtol=1e-5, atol=1e-7)
    assert str(root / "mixed_hessian") in (root / "query" / "config.yaml").read_text()


def test_resume_reuses_every_finished_step(mixed_run):
    from bergson_ray.pipelines.trackstar import STEPS, trackstar

    root, cfg, _, _ = mixed_run
    with pytest.raises(RunExistsError, match="--resume"):  # refused before any work
        trackstar(**cfg)
    mtimes = {s: os.stat(root / s).st_mtime_ns for s in STEPS}
    trackstar(resume=True, **cfg)
    assert _summary(root)["ran"] == [] and _summary(root)["reused"] == list(STEPS)
    assert {s: os.stat(root / s).st_mtime_ns for s in STEPS} == mtimes


def test_resume_recomputes_only_a_missing_step(mixed_run):
    import shutil

    from bergson_ray.pipelines.trackstar import STEPS, trackstar

    root, cfg, first, _ = mixed_run
    mtimes = {s: os.stat(root / s).st_mtime_ns for s in STEPS[:-1]}
    shutil.rmtree(root / "scores")
    again = _scores(trackstar(resume=True, **cfg))
    assert _summary(root)["ran"] == ["scores"]
    np.testing.assert_allclose(again, first, rtol=1e-6, atol=1e-7)
    assert {s: os.stat(root / s).st_mtime_ns for s in STEPS[:-1]} == mtimes


def test_resume_without_mixing_rebuilds_what_used_the_mix(mixed_run):
    from bergson_ray.pipelines.trackstar import trackstar

    root, cfg, _, _ = mixed_run
    trackstar(resume=True, **{**cfg, "mix_hessians": False})
    assert _summary(root)["ran"] == ["query", "scores"]
    assert _summary(root)["reused"] == ["value_hessian"]
    assert str(root / "value_hessian") in (root / "query" / "config.yaml").read_text()


def test_trackstar_needs_a_projection():
    assert as_config(TrackstarRunConfig).grad.projection_dim == 16  # bergson's default
    with pytest.raises(BadInputError, match="projection_dim must be > 0"):
        as_config(TrackstarRunConfig, run_path="x", projection_dim=0)


def test_trackstar_refuses_its_own_hessian_path():
    with pytest.raises(BadInputError, match="fits its own Hessian"):
        as_config(TrackstarRunConfig, run_path="x", hessian_path="h")


def test_empty_query_set_fails_before_any_step(tmp_path):
    from bergson_ray.pipelines.trackstar import trackstar

    root = tmp_path / "ts"
    with pytest.raises(BadInputError, match="no rows") as err:
        trackstar(run_path=str(root), **{**COMMON, "query.split": "train[3:3]"})
    assert "\n" not in str(err.value)
    assert not root.exists()


def test_first_rows_keeps_the_users_slice(tiny_assets):
    from bergson_ray.config import DataConfig
    from bergson_ray.pipelines.trackstar import first_rows

    data = DataConfig(dataset="tiny", split="train[4:10]")
    assert first_rows(data, 3).split == "train[4:7]"
    assert first_rows(data, 100).split == "train[4:10]"  # never more than the user gave
    assert first_rows(DataConfig(dataset="tiny"), 5).split == "train[0:5]"
    assert first_rows(data, None) is data
