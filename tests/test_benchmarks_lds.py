"""Smoke test of the LDS benchmark's pieces (``benchmarks/lds.py``): no Ray, no training."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _lds_recipe  # noqa: E402
import lds  # noqa: E402


def test_recipe_flags_match_ours():
    """bergson's training flags carry the same values as our keyword arguments."""
    from bergson_ray.config.coerce import as_config
    from bergson_ray.config.training import TrainRunConfig

    r = _lds_recipe.Recipe(docs=8, queries=2, lr=3e-3, epochs=3, batch_size=4)
    cfg = as_config(TrainRunConfig, run_path="x", **r.training_kwargs())
    flags = r.bergson_training_flags()
    value = {flags[i]: flags[i + 1] for i in range(0, len(flags), 2)}
    assert float(value["--lr"]) == cfg.training.lr_schedule.lr
    assert int(value["--num_epochs"]) == cfg.training.num_epochs
    assert int(value["--batch_size"]) == cfg.training.batch_size
    assert value["--save_mode"] == cfg.training.save_mode


def test_prepare_data_holds_queries_out(tmp_path):
    import datasets

    r = _lds_recipe.Recipe(docs=24, queries=3)
    train, query, info = _lds_recipe.prepare_data(tmp_path, r)
    t = list(datasets.load_from_disk(str(train))["text"])
    q = list(datasets.load_from_disk(str(query))["text"])
    assert (len(t), len(q)) == (24, 3) == (info["train_docs"], info["query_docs"])
    assert not set(t) & set(q)
    again = _lds_recipe.prepare_data(tmp_path / "again", r)[2]
    assert again == info  # seeded: the same draw every time


def test_table_renders_errors_and_numbers(tmp_path):
    args = argparse.Namespace(out=str(tmp_path))
    b = lds.Bench(args, _lds_recipe.Recipe())
    b.figures.update(
        data={"train_docs": 256, "query_docs": 8},
        bank={"subsets": 64, "removed": "25/26"},
        scores={"bergson_ray": {"gradient dot": {"scores": "d", "seconds": 3.0}}},
        lds={
            "bergson_ray": {"gradient dot": {"lds": 0.5}},
            "bergson": {"MAGIC": {"error": "bergson magic failed (rc 1): boom"}},
        },
        timing={
            "ours_w1": {"retrains": 4, "per_min_loop": 10.0, "per_min_wall": 8.0},
            "ours_w2": {"retrains": 4, "per_min_loop": 19.0, "per_min_wall": 15.0},
            "speedup_2_vs_1": 1.9,
        },
    )
    text = lds.table(b)
    assert "| gradient dot | 0.500 | - | 3.0 | - |" in text
    assert "boom" in text
    assert "2 vs 1 worker: 1.90x" in text


def test_every_method_has_a_row_and_skips_say_which_flag(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), skip_lissa=True, methods=list(lds.KEYS.values()))
    b = lds.Bench(args, _lds_recipe.Recipe())
    assert not b.wanted("LiSSA") and b.wanted("TRAK") and b.wanted("SOURCE")
    b.figures.update(data={"train_docs": 8, "query_docs": 2}, lds={"bergson_ray": {
        "LiSSA": lds.skipped("LiSSA"), "SOURCE": {"lds": 0.25}}})  # fmt: skip
    text = lds.table(b)
    assert all(f"| {name} |" in text for name in lds.METHODS)
    assert "| LiSSA | skipped (--skip-lissa) |" in text and "| SOURCE | 0.250 |" in text


def test_source_states_and_bergsons_lr_lists(tmp_path):
    """SOURCE's trajectory: the states after step 0, trimmed to whole segments from the
    front; bergson's --lr_list x --step_size_list sums each segment's learning rates."""
    run = tmp_path / "train"
    for step in (0, 2, 4, 6):
        (run / "checkpoints" / f"step_{step}.ckpt").mkdir(parents=True)
    history = [{"step": s, "learning_rate": 0.1 * s} for s in range(1, 7)]
    (run / "checkpoints" / "log_history.json").write_text(json.dumps(history))
    b = lds.Bench(argparse.Namespace(out=str(tmp_path)), _lds_recipe.Recipe())
    b.train_run = run
    states = b.source_states()
    assert [p.name for p in states] == ["step_4.ckpt", "step_6.ckpt"]  # 3 -> 2 for 2 segments
    lrs, counts = b.source_lr_lists(states)
    assert counts == [4, 2]  # segment 0 covers steps 1-4, segment 1 steps 5-6
    assert [lr * k for lr, k in zip(lrs, counts)] == pytest.approx([1.0, 1.1])
