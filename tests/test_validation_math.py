"""Pure validation math (no Ray): subsets as bergson draws them, correlations, LDS, CSVs."""

from __future__ import annotations

import csv
import math
import random

import numpy as np
import pytest
import torch

from bergson_ray.errors import BadInputError
from bergson_ray.validation.csv_out import write_summary, write_validation
from bergson_ray.validation.lds import compute_lds
from bergson_ray.validation.losses import LossBook, mean_loss
from bergson_ray.validation.stats import betainc, pearson, rankdata, spearman, t_test_pvalue
from bergson_ray.validation.subsets import (
    draw_subsets,
    load_subsets,
    pool_indices,
    random_removals,
    same_subsets,
    save_subsets,
    tail_removal,
)


def _bergson_draw(valid: torch.Tensor, count: int, fraction: float, seed: int):
    """bergson 2.5.1's draw (validate_scores), restated independently for comparison."""
    rng = torch.Generator().manual_seed(seed)
    if fraction > 0:
        k = max(1, round(fraction * len(valid)))
        return [valid[torch.randperm(len(valid), generator=rng)[:k]] for _ in range(count)]
    perm = valid[torch.randperm(len(valid), generator=rng)]
    subsets = list(perm.chunk(count))
    random.Random(seed).shuffle(subsets)
    return subsets


def test_partition_covers_every_document_once():
    subsets = draw_subsets(np.arange(103), count=10, fraction=0.0, seed=7)
    allofthem = np.concatenate(subsets)
    assert sorted(allofthem.tolist()) == list(range(103))
    assert len(subsets) == 10


def test_partition_matches_bergson_including_short_chunking():
    for n, count, seed in [(103, 10, 7), (10, 6, 0), (8, 8, 42)]:
        ours = draw_subsets(np.arange(n), count, 0.0, seed)
        theirs = _bergson_draw(torch.arange(n), count, 0.0, seed)
        assert [s.tolist() for s in ours] == [t.tolist() for t in theirs]
    # 10 docs in 6 chunks: torch.chunk makes 5 chunks of 2, as bergson gets
    assert len(draw_subsets(np.arange(10), 6, 0.0, 0)) == 5


def test_fraction_draws_have_the_right_size_and_match_bergson():
    pool = np.arange(3, 200, 2)  # a pool that is not 0..n-1 (exclude_zero_scores)
    ours = draw_subsets(pool, count=5, fraction=0.1, seed=3)
    assert all(len(s) == round(0.1 * len(pool)) for s in ours)
    assert all(len(set(s.tolist())) == len(s) for s in ours)  # no repeats inside a subset
    assert all(set(s.tolist()) <= set(pool.tolist()) for s in ours)
    theirs = _bergson_draw(torch.as_tensor(pool), 5, 0.1, 3)
    assert [s.tolist() for s in ours] == [t.tolist() for t in theirs]


def test_same_seed_same_subsets_other_seed_differs():
    a = draw_subsets(np.arange(50), 5, 0.0, 1)
    b = draw_subsets(np.arange(50), 5, 0.0, 1)
    c = draw_subsets(np.arange(50), 5, 0.0, 2)
    assert same_subsets(a, b) and not same_subsets(a, c)


def test_manifest_round_trip(tmp_path):
    subsets = draw_subsets(np.arange(40), 4, 0.25, 9)
    save_subsets(tmp_path / "subsets.json", subsets)
    back = load_subsets(tmp_path / "subsets.json")
    assert [s.tolist() for s in back] == [s.tolist() for s in subsets]
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize(
    "count,fraction,match",
    [(11, 0.0, "larger than the 10 documents"), (3, 1.5, r"in \(0, 1\]"), (3, -0.1, r"in \(0, 1\]")],
)
def test_bad_subset_requests(count, fraction, match):
    with pytest.raises(BadInputError, match=match):
        draw_subsets(np.arange(10), count, fraction, 0)


def test_bad_manifest(tmp_path):
    (tmp_path / "m.json").write_text('{"a": 1}')
    with pytest.raises(BadInputError, match="list of lists"):
        load_subsets(tmp_path / "m.json")


def test_exclude_zero_pool_and_tails():
    scores = np.array([[0.0], [-3.0], [2.0], [0.0], [-1.0], [5.0]])
    pool = pool_indices(scores, exclude_zero_scores=True)
    assert pool.tolist() == [1, 2, 4, 5]
    # loss-signed: proponents are the most negative, detractors the most positive
    assert sorted(tail_removal(scores[:, 0], pool, 2, "proponents").tolist()) == [1, 4]
    assert sorted(tail_removal(scores[:, 0], pool, 2, "detractors").tolist()) == [2, 5]
    ctrl = random_removals(pool, 2, 3, seed=0)
    assert len(ctrl) == 3 and all(len(c) == 2 and set(c.tolist()) <= {1, 2, 4, 5} for c in ctrl)


def _dense_pearson(x, y):
    return float(np.corrcoef(x, y)[0, 1])


def test_correlations_against_dense_numpy():
    rng = np.random.default_rng(0)
    for n in (5, 17, 60):
        x = rng.normal(size=n)
        y = 0.5 * x + rng.normal(size=n)
        assert pearson(x, y).statistic == pytest.approx(_dense_pearson(x, y), abs=1e-12)
        # dense Spearman: Pearson of ranks from a double argsort (no ties in float draws)
        rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
        assert spearman(x, y).statistic == pytest.approx(_dense_pearson(rx, ry), abs=1e-12)
    assert rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert math.isnan(spearman(np.ones(4), np.arange(4.0)).statistic)


def test_pvalues_against_closed_forms():
    # t with 1 dof is Cauchy: p = 1 - 2 atan|t| / pi; with 2 dof: p = 1 - |t| / sqrt(2 + t^2)
    for r in (0.1, 0.5, 0.9):
        t1 = r * math.sqrt(1 / (1 - r * r))
        assert t_test_pvalue(r, 3) == pytest.approx(1 - 2 * math.atan(t1) / math.pi, rel=1e-10)
        t2 = r * math.sqrt(2 / (1 - r * r))
        assert t_test_pvalue(r, 4) == pytest.approx(1 - t2 / math.sqrt(2 + t2 * t2), rel=1e-10)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # closed-form polynomial


def test_pvalues_against_scipy_if_installed():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=30), rng.normal(size=30)
    assert spearman(x, y).pvalue == pytest.approx(scipy_stats.spearmanr(x, y).pvalue, rel=1e-8)
    assert pearson(x, y).pvalue == pytest.approx(scipy_stats.pearsonr(x, y).pvalue, rel=1e-8)


def test_oracle_scores_give_lds_one_and_random_scores_do_not():
    rng = np.random.default_rng(0)
    n = 40
    effect = rng.normal(size=n)  # each document's true effect on the query loss
    subsets = draw_subsets(np.arange(n), n, 0.0, 0)  # leave-one-out
    baseline = np.array([2.0])
    losses = np.stack([baseline - effect[s].sum() for s in subsets])
    oracle = compute_lds(baseline, losses, effect[:, None], subsets, list(range(n)))
    assert oracle.mean_lds == pytest.approx(1.0)
    noise = compute_lds(baseline, losses, rng.normal(size=(n, 1)), subsets, list(range(n)))
    assert abs(noise.mean_lds) < 0.5


def test_csvs_have_bergsons_columns(tmp_path):
    subsets = [np.array([0, 1]), np.array([2])]
    scores = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, -1.0]])
    res = compute_lds(np.array([1.0, 2.0]), np.array([[0.5, 1.5], [0.0, 2.5]]), scores, subsets, [0, 1])
    write_validation(tmp_path / "v.csv", res, multi_query=True)
    write_summary(tmp_path / "s.csv", res, multi_query=True, n=2)
    rows = list(csv.DictReader(open(tmp_path / "v.csv")))
    assert list(rows[0]) == ["subset", "query", "diff", "score_sum"]
    assert [float(r["diff"]) for r in rows] == [0.5, 0.5, 1.0, -0.5]
    assert [float(r["score_sum"]) for r in rows] == [3.0, 1.0, 3.0, -1.0]
    head = next(csv.reader(open(tmp_path / "s.csv")))
    assert head == ["query", "spearman_corr", "spearman_p", "pearson_corr", "pearson_p", "N", "baseline_loss"]


def test_loss_book_is_atomic_and_lists_finished(tmp_path):
    book = LossBook(tmp_path)
    book.write("subset_3", np.array([1.0, 2.0]))
    (book.dir / ".subset_4.tmp-1.npy").write_bytes(b"partial")
    assert book.finished() == ["subset_3"]
    assert book.missing(["subset_3", "subset_4"]) == ["subset_4"]
    assert mean_loss(np.array([1.0, 4.0]), np.array([3, 1])) == pytest.approx(7 / 4)


def test_bergson_flat_and_nested_method_keys_migrate():
    from bergson_ray.config.coerce import from_dict
    from bergson_ray.config.validation import ValidateConfig, migrate_validation

    old = migrate_validation({"num_subsets": 7, "subset_fraction": 0.2, "subsets": "m.json",
                              "subset_start": 1, "subset_stop": 5})
    cfg = from_dict(ValidateConfig, old)
    assert (cfg.method, cfg.lds.count, cfg.lds.fraction, cfg.lds.manifest) == ("lds", 7, 0.2, "m.json")
    assert (cfg.lds.start, cfg.lds.stop) == (1, 5)
    bank = from_dict(ValidateConfig, migrate_validation({"retrained_dir": "a,b"}))
    assert bank.lds.subsets == "bank" and bank.lds.paths == ["a", "b"]
    filt = from_dict(ValidateConfig, migrate_validation(
        {"method": "filter-detractors", "num_subsets": 4, "controls": "skip"}))
    assert (filt.method, filt.filter.direction, filt.filter.fraction) == ("filter", "detractors", 0.25)
    assert filt.filter.controls.kind == "none"
    step = from_dict(ValidateConfig, migrate_validation({"weight_lrs": [0.5]}))
    assert step.method == "weight_step" and step.weight_step.lrs == [0.5]
    nested = from_dict(ValidateConfig, migrate_validation(
        {"method": {"kind": "filter", "fraction": 0.1, "controls": {"controls": "bank", "paths": "x"}}}))
    assert nested.filter.controls.kind == "bank" and nested.filter.controls.paths == ["x"]
    with pytest.raises(BadInputError, match="cannot mix"):
        migrate_validation({"method": {"kind": "lds"}, "num_subsets": 3})


def test_cli_flags_follow_the_selected_method_as_in_bergson():
    import argparse

    from bergson_ray.cli import validate as cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["validate", "R", "--scores", "S", "--method", "filter",
                              "--fraction", "0.1", "--count", "5", "--controls", "none"])
    cfg = cli.config_from_args(args)
    assert (cfg.filter.fraction, cfg.filter.controls.count, cfg.filter.controls.kind) == (0.1, 5, "none")
    assert cfg.lds.fraction == 0.0 and cfg.run.run_path == "R"
    args = parser.parse_args(["validate", "R", "--scores", "S", "--count", "9", "--seed", "3",
                              "--subsets", "bank", "--paths", "a,b"])
    cfg = cli.config_from_args(args)
    assert (cfg.lds.count, cfg.training.seed, cfg.lds.paths) == (9, 3, ["a", "b"])
    with pytest.raises(BadInputError, match=r"--fraction must be 0"):
        cli.config_from_args(parser.parse_args(["validate", "R", "--scores", "S", "--fraction", "2"]))
