"""bergson's ``score`` candidates (``--scores`` + ``--top_k`` / ``--fraction`` /
``--direction``), ``--token_influence output`` and ``hessian --module_partitions``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import anchor
import numpy as np
import pytest
import torch
from anchor import RUNS
from helpers import pad_batch, random_docs, tiny_gpt2, tiny_neox

from bergson_ray.config import GradientConfig, ScoreRunConfig, as_config
from bergson_ray.config.candidates import CandidateConfig
from bergson_ray.errors import BadInputError, StoreError
from bergson_ray.store.candidates import (
    candidate_count,
    keep_rows,
    record_rows,
    select_candidates,
)
from bergson_ray.store.run_dir import RunDir
from bergson_ray.store.score_store import ScoreStore
from bergson_ray.store.score_writer import ScoreWriter

N = 16
MODULE = "layers.3.attention.dense"
"""One small module: full (unprojected) gradients stay small for --token_influence output."""
COMMON = dict(projection_dim=0, modules=[MODULE], truncation=True, num_workers=1, executor="process")


# ----------------------------------------------------------------------- selection
def brute_force(scores: np.ndarray, k: int, high: bool) -> np.ndarray:
    order = np.argsort(-scores if high else scores, axis=0, kind="stable")[:k]
    return np.unique(order)


def test_kept_rows_are_each_columns_top_k_union():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(50, 4))
    for k in (1, 3, 7):
        for high in (True, False):
            assert np.array_equal(keep_rows(s, k, high), brute_force(s, k, high))
    assert np.array_equal(keep_rows(s, 50, True), np.arange(50))
    ties = np.array([[1.0], [2.0], [2.0], [2.0], [np.nan]])
    assert keep_rows(ties, 2, True).tolist() == [1, 2]  # ties: lower rows first
    assert keep_rows(ties, 2, False).tolist() == [0, 1]  # NaN ranks last either way
    assert [candidate_count(0, f, 10) for f in (0.25, 0.35, 0.01, 1.0)] == [2, 4, 1, 10]
    assert candidate_count(30, 0, 10) == 10


def _score_dir(path: Path, scores: np.ndarray, higher_is_better: bool | None) -> Path:
    run = RunDir(path)
    w = ScoreWriter(run.path, len(scores), scores.shape[1])
    w.write(np.arange(len(scores)), scores.astype(np.float32))
    w.close()
    if higher_is_better is not None:
        run.write_config({"score_cfg": {"higher_is_better": higher_is_better}}, command="score")
    return run.commit()


def test_selection_follows_the_earlier_runs_orientation(tmp_path):
    s = np.random.default_rng(1).normal(size=(20, 3))
    best_high, best_low = brute_force(s, 2, True), brute_force(s, 2, False)
    up = _score_dir(tmp_path / "up", s, True)
    down = _score_dir(tmp_path / "down", s, False)
    pick = lambda path, **kw: select_candidates(CandidateConfig(str(path), top_k=2, **kw), 20)  # noqa: E731
    assert np.array_equal(pick(up), best_high)
    assert np.array_equal(pick(up, direction="detractors"), best_low)
    assert np.array_equal(pick(down), best_low)  # lower is better there
    assert np.array_equal(pick(down, higher_is_better=True), best_high)  # the flag wins
    frac = select_candidates(CandidateConfig(str(up), fraction=0.1), 20)
    assert np.array_equal(frac, brute_force(s, 2, True))


def test_bad_earlier_runs_are_one_sentence(tmp_path):
    s = np.ones((6, 2))
    plain = _score_dir(tmp_path / "plain", s, None)
    with pytest.raises(BadInputError, match="set --candidates.higher_is_better"):
        select_candidates(CandidateConfig(str(plain), top_k=1), 6)
    with pytest.raises(BadInputError, match="has 6 rows but this run's dataset has 9"):
        select_candidates(CandidateConfig(str(plain), top_k=1, higher_is_better=True), 9)
    part = RunDir(tmp_path / "half")
    ScoreWriter(part.path, 6, 1).write([0], [[1.0]])
    with pytest.raises(BadInputError, match="incomplete"):
        select_candidates(CandidateConfig(str(part.commit()), top_k=1, higher_is_better=True), 6)
    with pytest.raises(BadInputError, match="does not exist"):
        select_candidates(CandidateConfig(str(tmp_path / "nope"), top_k=1), 6)


def test_candidates_of_a_candidate_run_map_back_to_dataset_rows(tmp_path):
    """A cascade: the earlier run is itself compact; its rows are candidates.npy's."""
    s = np.array([[5.0], [1.0], [9.0], [3.0]])
    earlier = _score_dir(tmp_path / "c", s, True)
    np.save(earlier / "candidates.npy", np.array([2, 7, 11, 40]))
    got = select_candidates(CandidateConfig(str(earlier), top_k=2), 50)
    assert got.tolist() == [2, 11]


def test_query_record_csv_keeps_each_querys_first_rows(tmp_path):
    """bergson's ``query --record`` (Top/Bottom) and ours (top/bottom) read alike."""
    from bergson_ray.query.results import QueryResult, format_csv

    theirs = tmp_path / "theirs.csv"
    with theirs.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query", "direction", "result", "result_index", "score"])
        for q, rows in (("a", [5, 3, 9]), ("b", [3, 1, 0])):
            for r in rows:
                w.writerow([q, "Top", "text", r, 1.0])
        w.writerow(["a", "Bottom", "text", 7, -1.0])
    assert record_rows(theirs, "proponents", 2, 10).tolist() == [1, 3, 5]
    assert record_rows(theirs, "proponents", 0, 10).tolist() == [0, 1, 3, 5, 9]
    assert record_rows(theirs, "detractors", 0, 10).tolist() == [7]
    ours = tmp_path / "ours.csv"
    ours.write_text(format_csv([QueryResult(ids=[4, 2], scores=[2.0, 1.0], query="x")]))
    got = select_candidates(CandidateConfig(str(ours), top_k=1), 10)
    assert got.tolist() == [4]
    with pytest.raises(BadInputError, match="refers to row 9; this run's dataset has 6 rows"):
        record_rows(theirs, "proponents", 0, 6)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(scores="x", top_k=3, fraction=0.2), "exactly one of --top_k and --fraction"),
        (dict(scores="x"), "exactly one of --top_k and --fraction"),
        (dict(fraction=0.2), "give it with --scores"),
        (dict(scores="q.csv", fraction=0.2), "does not apply to a query --record CSV"),
        (dict(scores="x", top_k=2, attribute_tokens=True), "does not support --attribute_tokens"),
        (dict(direction="sideways"), "unknown --direction"),
        (dict(token_influence="output", projection_dim=16), "does not support --projection_dim"),
        (dict(token_influence="output", projection_dim=0, unit_normalize=True), "--unit_normalize"),
    ],
)
def test_bad_options_are_one_sentence(kw, message):
    with pytest.raises(BadInputError, match=message):
        as_config(ScoreRunConfig, None, **kw)


def test_bare_top_k_is_bergsons_candidate_count_with_scores():
    cfg = as_config(ScoreRunConfig, None, scores="x", top_k=4)
    assert (cfg.candidates.top_k, cfg.score.top_k) == (4, 0)
    cfg = as_config(ScoreRunConfig, None, scores="x", top_k=5, **{"candidates.top_k": 2})
    assert (cfg.candidates.top_k, cfg.score.top_k) == (2, 5)  # top_k.parquet stays ours
    assert as_config(ScoreRunConfig, None, top_k=5).score.top_k == 5


def test_bergson_pipeline_steps_carry_candidates_and_partitions():
    from bergson_ray.config import HessianRunConfig
    from bergson_ray.config.bergson_steps import step_config

    body = {
        "score_cfg": {
            "token_influence": "output",
            "candidates": {"scores": "d", "top_k": 4, "direction": "detractors"},
        },
        "index_cfg": {"projection_dim": 0},
    }
    cfg = step_config("score", body, ScoreRunConfig, "step 0")
    assert cfg.token_influence == "output" and cfg.score.top_k == 0
    assert (cfg.candidates.scores, cfg.candidates.top_k, cfg.candidates.direction) == ("d", 4, "detractors")
    body = {"hessian_cfg": {"method": "kfac", "module_partitions": 3}}
    assert step_config("hessian", body, HessianRunConfig, "s").hessian.module_partitions == 3


# ------------------------------------------------------------------ output influence
def test_output_rates_are_each_loss_terms_gradient_along_the_query():
    """Row t = grad(weighted loss on token t+1) . q; the rows sum to the gradient score.
    GPT-2 (``Conv1D``, weights stored ``[in, out]``) with biases, a prompt, mean loss and
    advantages; the end-to-end test below covers GPT-NeoX's ``nn.Linear``."""
    from bergson_ray.data.batching import PackedBatch
    from bergson_ray.gradients import output_influence as oi
    from bergson_ray.gradients.engine import GradientEngine

    model = tiny_gpt2()
    oi.use_eager_attention(model)
    cfg = GradientConfig(projection_dim=0, include_bias=True, loss_reduction="mean")
    engine = GradientEngine(model, cfg)
    q = torch.randn(2, engine.dim, generator=torch.Generator().manual_seed(0))
    b = pad_batch(random_docs([6, 4], seed=3), prompt_lens=[2, 0])
    adv = torch.tensor([1.0, -0.5])
    dirs = oi.query_directions(model, engine.modules, engine.grad_sizes, q)
    rates, _ = oi.output_token_rates(model, b.input_ids, b.labels, dirs, reduction="mean", advantage=adv)

    rows = engine.compute(PackedBatch(b.input_ids, b.labels, b.lengths, adv)).rows.float()
    torch.testing.assert_close(rates.sum(1), rows @ q.T, rtol=1e-4, atol=1e-4)

    # autograd ground truth for every (document, term): one backward per loss term
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    logits = model(b.input_ids).logits
    terms = oi.token_losses(logits, b.labels, "ce", 0.0) * oi.term_weights(b.labels, "mean", adv)
    tangents = [oi._tangent(dirs, {k: v.detach() for k, v in params.items()}, j) for j in range(len(q))]
    want = torch.zeros_like(rates)
    for n in range(terms.shape[0]):
        for t in range(terms.shape[1]):
            grads = torch.autograd.grad(terms[n, t], list(params.values()), retain_graph=True, allow_unused=True)
            g = dict(zip(params, grads))
            for j, tangent in enumerate(tangents):
                want[n, t, j] = sum((g[k] * v).sum() for k, v in tangent.items() if g[k] is not None)
    torch.testing.assert_close(rates, want, rtol=1e-4, atol=1e-5)
    assert torch.all(rates[0, :1] == 0)  # prompt tokens carry no loss term


def test_output_influence_refuses_a_projected_query():
    from bergson_ray.gradients import output_influence as oi
    from bergson_ray.gradients.engine import GradientEngine

    model = tiny_neox()
    engine = GradientEngine(model, GradientConfig(projection_dim=4))
    q = torch.zeros(1, engine.dim)
    with pytest.raises(BadInputError, match="needs an unprojected query"):
        oi.query_directions(model, engine.modules, engine.grad_sizes, q)


# --------------------------------------------------------------------- partitions
def test_partitions_are_contiguous_and_near_equal():
    from bergson_ray.hessians.partitions import partition_modules

    names = [f"m{i}" for i in range(7)]
    assert partition_modules(names, 3) == [["m0", "m1", "m2"], ["m3", "m4"], ["m5", "m6"]]
    assert partition_modules(names, 1) == [names]
    assert len(partition_modules(names, 20)) == 7


# ------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_session, tiny_assets):
    from bergson_ray.pipelines.build import build
    from bergson_ray.pipelines.score import score

    root = tmp_path_factory.mktemp("cand")
    query = build(run_path=root / "q", dataset=str(tiny_assets.query_dir), split="train[:3]", **COMMON)
    kw = dict(dataset="tiny", split=f"train[:{N}]", query_path=str(query), **COMMON)
    full = score(run_path=root / "full", **kw)  # the earlier ("cheap") run: every row
    # the expensive one: output token influence on the 2 lowest rows per query column
    cand = score(run_path=root / "cand", scores=str(full), direction="detractors", top_k=5,
                 token_influence="output", **{"candidates.top_k": 2}, **kw)
    return dict(root=root, query=query, full=full, cand=cand, kw=kw)


@pytest.mark.ray
def test_rescored_rows_equal_the_full_runs_rows(runs):
    """Only the kept rows are scored, stored compactly with candidates.npy (bergson's
    layout), and their output-influence scores equal the full gradient run's there."""
    import datasets
    import pyarrow.parquet as pq
    import yaml

    full, cand = ScoreStore.open(runs["full"]), ScoreStore.open(runs["cand"])
    want = brute_force(full.scores, 2, False)  # detractors: each column's 2 lowest
    assert 2 < len(want) < N and np.array_equal(np.load(runs["cand"] / "candidates.npy"), want)
    assert np.array_equal(cand.row_ids, want)
    assert cand.num_rows == len(want) and cand.is_complete()  # compact: no other rows stored
    scale = np.abs(full.scores).max()
    np.testing.assert_allclose(cand.scores, full.scores[want], rtol=2e-4, atol=1e-5 * scale)
    data = datasets.load_from_disk(str(runs["cand"] / "data.hf"))
    base = datasets.load_from_disk(str(runs["full"] / "data.hf"))
    assert data["text"] == [base["text"][i] for i in want]
    assert data["length"] == [base["length"][i] for i in want]
    summary = json.loads((runs["cand"] / "summary.json").read_text())
    assert (summary["computed_documents"], summary["dataset_rows"]) == (len(want), N)
    parquet = pq.read_table(runs["cand"] / "top_k.parquet").to_pandas()
    best = parquet[(parquet["direction"] == "top") & (parquet["rank"] == 1)]
    for q, row in zip(best["query"], best["row"]):  # rows named by dataset row
        assert row == want[np.argmax(cand.scores[:, q])]
    step = yaml.safe_load((runs["cand"] / "config.yaml").read_text())["steps"][0]["score"]
    assert step["score_cfg"]["token_influence"] == "output"
    assert step["score_cfg"]["candidates"]["direction"] == "detractors"


@pytest.mark.ray
def test_earlier_run_of_another_dataset_fails_before_any_work(runs):
    from bergson_ray.pipelines.score import score

    kw = {**runs["kw"], "split": f"train[:{N - 2}]"}
    with pytest.raises(BadInputError, match=f"has {N} rows but this run's dataset has {N - 2}"):
        score(run_path=runs["root"] / "bad", scores=str(runs["full"]), top_k=2, **kw)
    assert not (runs["root"] / "bad.part").exists()  # nothing left to --overwrite


def test_two_module_partitions_write_the_same_factors(tmp_path):
    from safetensors.torch import load_file

    from bergson_ray.pipelines.hessian import hessian

    kw = dict(dataset="tiny", split="train[:4]", truncation=True, executor="process",
              method="kfac", ev_correction=True, modules=["layers.0.attention.*"])
    # one partition: 2 shards write 2 files; two: 1 module and 1 shard each, still 2 files
    one = hessian(run_path=tmp_path / "one", **kw)
    two = hessian(run_path=tmp_path / "two", module_partitions=2, **kw)
    files = sorted(p.relative_to(one) for p in one.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(two) for p in two.rglob("*.safetensors"))
    assert not list(two.glob("partition_*"))
    for f in files:
        a, b = load_file(one / f), load_file(two / f)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a), f
    info = json.loads((two / "hessian_info.json").read_text())
    assert info["module_partitions"] == 2


# -------------------------------------------------------------- bergson's own files


@anchor.needs_anchor
def test_we_read_bergsons_candidate_store(tmp_path):
    """bergson's ``--scores score_p16 --top_k 3`` store: its rows are ours, its values its
    own; and bergson's ``load_scores`` reads the candidate rows of a store we write."""
    anchor.cli_runs(["score_p16"])  # and the query it scores against
    out = RUNS / "score_candidates_top3"
    if not (out / "info.json").exists():
        q = anchor.MODEL
        cmd = ["bergson", "score", str(out), "--query_path", str(RUNS / "query_p16"),
               "--dataset", str(anchor.DATA / "pydoc"), "--split", "train[:20]", "--model", str(q),
               "--projection_dim", "16", "--truncation", "--overwrite", "true",
               "--scores", str(RUNS / "score_p16"), "--top_k", "3"]
        anchor.run(cmd, cwd=RUNS, timeout=600).check_returncode()
    theirs, full = ScoreStore.open(out), ScoreStore.open(RUNS / "score_p16")
    mine = select_candidates(CandidateConfig(str(RUNS / "score_p16"), top_k=3), full.num_rows)
    assert theirs.candidates is not None and np.array_equal(theirs.row_ids, mine)
    np.testing.assert_allclose(theirs.scores, full.scores[mine], rtol=1e-4, atol=1e-3)
    with pytest.raises(BadInputError, match="a candidate run naming row"):
        select_candidates(CandidateConfig(str(out), top_k=1), int(theirs.row_ids.max()))
    with pytest.raises(StoreError):
        ScoreStore.open(out / "missing")

    from bergson_ray.store.candidates import save_candidates

    ours = tmp_path / "ours"
    ScoreWriter(ours, 2, 1).write([0, 1], [[1.5], [-2.0]])
    save_candidates(ours, np.array([3, 8]))
    script = (
        "import sys, json, numpy as np; from pathlib import Path; from bergson.data import load_scores;"
        "s = load_scores(Path(sys.argv[1]));"
        "print(json.dumps([s.candidates.tolist(), np.asarray(s[:]).ravel().tolist()]))"
    )
    res = anchor.run(["python", "-c", script, str(ours)], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [[3, 8], [1.5, -2.0]]
