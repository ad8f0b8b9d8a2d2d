"""``magic`` on Ray: the per-query pool (1 vs 2 workers, a lost worker, resume), the
score store validate reads, and bad input rejected with one sentence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bergson_ray.config.magic import MagicRunConfig
from bergson_ray.errors import BadInputError
from bergson_ray.testing.faults import FaultPlan

RECIPE = dict(
    dataset="tiny", split="train[:8]", truncation=True, batch_size=4, lr=1e-3,
    torch_threads=1, **{"query.dataset": "tiny", "query.split": "train[40:43]",
                        "query.truncation": True},
)


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def _columns(path: Path) -> np.ndarray:
    from bergson_ray.store.score_store import ScoreStore

    return np.asarray(ScoreStore.open(path / "scores").scores)


@pytest.fixture(scope="module")
def one_worker(ray_session, tmp_path_factory):
    from bergson_ray.pipelines.magic import magic

    root = tmp_path_factory.mktemp("magic")
    # one worker in this process (no Ray); the Ray pools below must give the same columns
    return magic(run_path=str(root / "one"), executor="process", cleanup_ckpts=False, **RECIPE)


@pytest.mark.ray
def test_one_worker_writes_loss_signed_store(one_worker):
    from bergson_ray.validation.scores import load_loss_signed

    s = _summary(one_worker)
    assert (s["columns"], s["columns_computed"], s["columns_reused"]) == (3, 3, 0)
    scores = load_loss_signed(one_worker / "scores")
    assert scores.matrix.shape == (8, 3) and not scores.negated
    info = json.loads((one_worker / "scores" / "info.json").read_text())
    assert info["num_scores"] == 3 and info["attribute_tokens"] is False
    assert np.abs(scores.matrix).max() > 0
    assert (one_worker / "checkpoints" / "final.ckpt").is_dir()  # --cleanup_ckpts false


@pytest.mark.ray
def test_two_workers_and_a_lost_worker_give_the_same_columns(one_worker, tmp_path):
    from bergson_ray.pipelines.magic import magic

    plan = FaultPlan(crash_worker_after_batches=1, crash_marker=str(tmp_path / "crashed"))
    out = magic(run_path=str(tmp_path / "two"), num_workers=2, faults=plan, **RECIPE)
    s = _summary(out)
    assert (tmp_path / "crashed").exists() and s["columns_lost"] == 1
    assert s["columns_computed"] == 3 and s["workers"] == 2
    np.testing.assert_array_equal(_columns(out), _columns(one_worker))
    assert not (out / "checkpoints").exists()  # cleaned up


@pytest.mark.ray
def test_resume_computes_only_missing_columns(one_worker, tmp_path):
    from bergson_ray.pipelines.magic import magic

    part = tmp_path / "run.part"
    shutil.copytree(one_worker, part)
    (part / "per_query" / "q1.npy").unlink()
    shutil.rmtree(part / "scores")
    out = magic(run_path=str(tmp_path / "run"), num_workers=1, resume=True, **RECIPE)
    s = _summary(out)
    assert (s["columns_computed"], s["columns_reused"], s["forward_ran"]) == (1, 2, False)
    np.testing.assert_array_equal(_columns(out), _columns(one_worker))


def test_bad_input_is_one_sentence(tmp_path):
    from bergson_ray.config.coerce import as_config
    from bergson_ray.pipelines.magic import magic

    with pytest.raises(BadInputError, match="--save_mode interval"):
        as_config(MagicRunConfig, run_path="x", save_mode="interval", save_interval=2)
    with pytest.raises(BadInputError, match="--train_mode"):
        as_config(MagicRunConfig, run_path="x", train_mode=True, double_backward_batch_size=2)
    with pytest.raises(BadInputError, match="--attribute_tokens"):
        as_config(MagicRunConfig, run_path="x", attribute_tokens=True, skip_validation=False)
    (tmp_path / "done" / "scores").mkdir(parents=True)
    with pytest.raises(BadInputError, match="scores already exist"):
        magic(run_path=str(tmp_path / "done"))


def test_per_token_store_layout(tmp_path):
    from bergson_ray.magic.engine import DataShape
    from bergson_ray.pipelines.magic import write_scores
    from bergson_ray.store.score_store import ScoreStore

    rng = np.random.default_rng(0)
    lengths = (3, 5, 1, 4)
    cols = []
    for _ in range(2):
        c = np.zeros((4, 5), np.float32)
        for d, n in enumerate(lengths):
            c[d, : n - 1] = rng.normal(size=n - 1)
        cols.append(c)
    write_scores(tmp_path / "s", cols, DataShape(4, 2, lengths), per_token=True)
    store = ScoreStore.open(tmp_path / "s")
    assert store.attribute_tokens and store.scores.shape == (2 + 4 + 0 + 3, 2)
    offsets = np.load(tmp_path / "s" / "offsets.npy")
    assert offsets.tolist() == [0, 2, 6, 6, 9]
    for d in range(4):
        np.testing.assert_allclose(
            store.scores[offsets[d] : offsets[d + 1]].sum(0), [c[d].sum() for c in cols], rtol=1e-6
        )
    assert store.higher_is_better is False


def test_query_without_tokens_is_rejected(tmp_path):
    from bergson_ray.config.sections import DataConfig, ModelConfig
    from bergson_ray.config.training import TrainingConfig
    from bergson_ray.magic.engine import MagicSpec

    short = tmp_path / "q.jsonl"
    short.write_text('{"text": "a"}\n{"text": "b"}\n')
    spec = MagicSpec(
        ModelConfig(), DataConfig(split="train[:4]", truncation=True),
        DataConfig(dataset=str(short)), TrainingConfig(batch_size=4),
        checkpoints=str(tmp_path / "c"), columns=str(tmp_path / "q"),
    )
    with pytest.raises(BadInputError, match="no loss-bearing tokens"):
        spec.build()


@pytest.mark.ray
def test_skip_validation_false_runs_the_lds(ray_session, tmp_path):
    from bergson_ray.pipelines.magic import magic

    out = magic(run_path=str(tmp_path / "v"), num_workers=1, aggregation="mean",
                skip_validation=False, count=2, **RECIPE)
    assert _summary(out)["columns"] == 1
    summary = (out / "validation" / "summary.csv").read_text().splitlines()
    assert len(summary) == 2 and "spearman" in summary[0]


def test_cli_takes_bergsons_option_names():
    import argparse

    from bergson_ray.cli import magic as cli

    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers())
    args = p.parse_args([
        "magic", "out", "--model", "tiny", "--dataset", "tiny", "--query.dataset", "q.jsonl",
        "--aggregation", "mean", "--per_token", "--double_backward_batch_size", "2",
        "--save_mode", "log", "--backward_save_every", "3", "--cleanup_ckpts", "false",
    ])
    cfg = cli.config_from_args(args)
    assert cfg.run.run_path == "out" and cfg.query.dataset == "q.jsonl"
    m = cfg.magic
    assert (m.aggregation, m.attribute_tokens, m.double_backward_batch_size) == ("mean", True, 2)
    assert (m.backward_save_every, m.cleanup_ckpts, m.skip_validation) == (3, False, True)
    assert cfg.training.save_mode == "log" and cfg.training.save_optimizer_state == "none"
