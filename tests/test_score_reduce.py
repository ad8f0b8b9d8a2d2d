"""``reduce`` and ``score`` on Ray agree with arithmetic on ``build`` rows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from bergson_ray.errors import BadInputError
from bergson_ray.pipelines.build import build
from bergson_ray.pipelines.reduce import reduce
from bergson_ray.pipelines.score import score
from bergson_ray.store.gradient_store import GradientStore
from bergson_ray.store.processor import save_hessians
from bergson_ray.store.score_store import ScoreStore
from bergson_ray.testing.faults import FaultPlan

pytestmark = pytest.mark.ray

P = 8
N = 24
# In process (tests/test_in_process.py: the same numbers as a Ray pool); the fault-plan
# tests below run on Ray whatever COMMON says, and the reduce invariance test asks for it.
COMMON = dict(projection_dim=P, truncation=True, num_workers=1, executor="process")


def rows(path) -> np.ndarray:
    s = GradientStore.open(path)
    return s.rows(np.arange(s.num_grads)).numpy().astype(np.float64)


def close(got, want, tol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err <= tol, f"relative deviation {err:.2e} > {tol:.0e}"


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, ray_session, tiny_assets):
    root = tmp_path_factory.mktemp("stores")
    train = build(run_path=root / "train", dataset="tiny", split=f"train[:{N}]", **COMMON)
    query = build(run_path=root / "query", dataset=str(tiny_assets.query_dir), split="train[:3]", **COMMON)
    return root, train, query


def run_score(root, name, query, **kw):
    return score(run_path=root / name, dataset="tiny", split=f"train[:{N}]", query_path=str(query),
                 **{**COMMON, **kw})


def test_individual_and_nearest_equal_dot_products(stores):
    root, train, query = stores
    X, Q = rows(train), rows(query)
    ind = ScoreStore.open(run_score(root, "ind", query))
    assert ind.is_complete() and ind.scores.shape == (N, 3)
    close(ind.scores, X @ Q.T)
    near = ScoreStore.open(run_score(root, "near", query, score="nearest"))
    close(near.scores[:, 0], (X @ Q.T).max(1))


def test_cosine_and_mean_modes(stores):
    root, train, query = stores
    X, Q = rows(train), rows(query)
    cos = ScoreStore.open(run_score(root, "cos", query, unit_normalize=True))
    close(cos.scores, unit(X) @ unit(Q).T)
    assert np.all(np.abs(cos.scores) <= 1 + 1e-5)
    mean = ScoreStore.open(run_score(root, "mean", query, score="mean", query_batch_size=2))
    close(mean.scores[:, 0], X @ Q.mean(0))


def test_self_influence_ranks_the_source_document_first(tmp_path, ray_session, tiny_assets):
    """A query copied from corpus row r scores row r highest (cosine)."""
    import datasets

    q = datasets.load_from_disk(str(tiny_assets.query_dir))
    src = int(q[0]["src_idx"])
    lo = max(0, src - 10)
    query = build(run_path=tmp_path / "q", dataset=str(tiny_assets.query_dir), split="train[:1]", **COMMON)
    out = score(run_path=tmp_path / "s", dataset="tiny", split=f"train[{lo}:{lo + 20}]",
                query_path=str(query), unit_normalize=True, top_k=3, **COMMON)
    s = ScoreStore.open(out).scores[:, 0]
    assert int(np.argmax(s)) + lo == src
    import pyarrow.parquet as pq

    top = pq.read_table(out / "top_k.parquet").to_pandas()
    assert top.iloc[0]["row"] == src - lo and top.iloc[0]["text"] == q[0]["text"]


@pytest.mark.parametrize("workers", [1, 2])
def test_reduce_equals_mean_and_sum_of_build_rows(stores, workers, tmp_path):
    """The mean with one worker in process and with two on a Ray pool (whose partial sums
    the reducer actor combines; one Ray worker = in process: tests/test_in_process.py);
    the unit-normalized sum in process."""
    root, train, _ = stores
    X = rows(train)
    kw = {**COMMON, "num_workers": workers, "window_size": 5,
          "executor": "ray" if workers > 1 else "process"}  # fmt: skip
    mean = rows(reduce(run_path=tmp_path / "m", dataset="tiny", split=f"train[:{N}]", **kw))
    close(mean[0], X.mean(0))
    if workers > 1:
        return
    total = rows(reduce(run_path=tmp_path / "s", dataset="tiny", split=f"train[:{N}]",
                        aggregation="sum", unit_normalize=True, **kw))
    close(total[0], unit(X).sum(0))


def test_reduce_with_killed_worker_counts_each_document_once(stores, tmp_path):
    root, train, _ = stores
    marker = tmp_path / "crashed"
    out = reduce(run_path=tmp_path / "m", dataset="tiny", split=f"train[:{N}]", window_size=4,
                 faults=FaultPlan(crash_worker_after_batches=2, crash_marker=str(marker)), **COMMON)
    assert marker.exists()
    close(rows(out)[0], rows(train).mean(0))


def random_spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)).float()


def mat_power(h: np.ndarray, power: float, damping=0.1) -> np.ndarray:
    lam, vec = np.linalg.eigh(h.astype(np.float64))
    lam = np.clip(lam, 0, None)
    m = 1.0 / (lam + damping * lam.mean())
    m = m if power == -1 else np.sqrt(m)
    return (vec * m) @ vec.T


def test_dense_preconditioned_scores(stores, tmp_path):
    root, train, query = stores
    sizes = GradientStore.open(train).grad_sizes
    hess = {name: random_spd(size, k) for k, (name, size) in enumerate(sizes.items())}
    hdir = tmp_path / "hess"
    hdir.mkdir()
    save_hessians(hdir, hess)
    X, Q = rows(train), rows(query)

    def per_module(A, power):
        out, c = [], 0
        for name, size in sizes.items():
            out.append(A[:, c : c + size] @ mat_power(hess[name].numpy(), power))
            c += size
        return np.concatenate(out, 1)

    inner = ScoreStore.open(run_score(root, "pinner", query, hessian_path=str(hdir)))
    close(inner.scores, X @ per_module(Q, -1).T, tol=1e-4)
    cos = ScoreStore.open(run_score(root, "pcos", query, hessian_path=str(hdir), unit_normalize=True))
    close(cos.scores, unit(per_module(X, -0.5)) @ unit(per_module(Q, -0.5)).T, tol=1e-4)
    # H^{-1/2} applied twice is H^{-1}
    close(per_module(per_module(Q, -0.5), -0.5), per_module(Q, -1), tol=1e-8)


def test_killed_score_worker_and_resume(stores, tmp_path):
    root, train, query = stores
    ref = ScoreStore.open(run_score(root, "ind_ref", query)).scores
    marker = tmp_path / "crashed"
    out = score(run_path=tmp_path / "k", dataset="tiny", split=f"train[:{N}]", query_path=str(query),
                window_size=4, faults=FaultPlan(crash_worker_after_batches=2, crash_marker=str(marker)), **COMMON)
    assert marker.exists()
    killed = ScoreStore.open(out)
    assert killed.written.all()
    close(killed.scores, ref, tol=1e-6)

    # an interrupted run: rows 3..9 never written; --resume computes exactly those
    part = tmp_path / "r.part"
    shutil.copytree(out, part)
    shutil.rmtree(part / "data.hf")
    mm = np.memmap(part / "scores.bin", dtype=killed.mm.dtype, mode="r+")
    for q in range(3):
        mm[f"written_{q}"][3:10] = False
        mm[f"score_{q}"][3:10] = 0
    mm.flush()
    resumed = score(run_path=tmp_path / "r", dataset="tiny", split=f"train[:{N}]",
                    query_path=str(query), resume=True, **COMMON)
    assert json.loads((resumed / "summary.json").read_text())["computed_documents"] == 7
    close(ScoreStore.open(resumed).scores, ref, tol=1e-6)


def test_bad_query_inputs(stores, tmp_path):
    root, train, query = stores
    with pytest.raises(BadInputError, match="query_path"):
        score(run_path=tmp_path / "a", dataset="tiny", **COMMON)
    with pytest.raises(BadInputError, match="does not exist"):
        score(run_path=tmp_path / "b", dataset="tiny", query_path=str(tmp_path / "nope"), **COMMON)
    with pytest.raises(BadInputError, match="projection_dim"):
        score(run_path=tmp_path / "c", dataset="tiny", query_path=str(query),
              **{**COMMON, "projection_dim": 4})
    partial = build(run_path=tmp_path / "pq", dataset="tiny", split="train[:2]",
                    modules=["layers.0.*"], **COMMON)
    with pytest.raises(BadInputError, match="has no rows for module"):
        score(run_path=tmp_path / "e", dataset="tiny", query_path=str(partial), **COMMON)
    with pytest.raises(BadInputError, match="empty|has no rows"):
        score(run_path=tmp_path / "f", dataset="tiny", split="train[:0]", query_path=str(query), **COMMON)
    for name in "abcef":
        assert not (tmp_path / name).exists()


def _query_record(path, model: str):
    """A query store's ``config.yaml`` as ``build`` writes it (only the record matters)."""
    from bergson_ray.config import BuildConfig, ModelConfig, RunConfig
    from bergson_ray.store.config_yaml import build_step_body
    from bergson_ray.store.run_dir import RunDir

    run = RunDir(path)
    run.write_config(build_step_body(BuildConfig(run=RunConfig(str(path)), model=ModelConfig(model))),
                     command="build")
    return run.commit()


def test_query_store_from_another_model_is_refused_or_flagged(tmp_path, tiny_assets, caplog):
    """Same projection size is not enough: another architecture is refused naming the
    difference, other weights of the same architecture are scored with a warning, and a
    module the query never saw is refused."""
    from transformers import AutoConfig

    from bergson_ray.config import ModelConfig, ScoreRunConfig
    from bergson_ray.errors import BadInputError
    from bergson_ray.pipelines.score import check_query_model

    base = AutoConfig.from_pretrained(str(tiny_assets.model_dir))
    wider = tmp_path / "wider"
    base.hidden_size *= 2
    base.save_pretrained(wider)
    same = tmp_path / "same"
    AutoConfig.from_pretrained(str(tiny_assets.model_dir)).save_pretrained(same)
    cfg = ScoreRunConfig(model=ModelConfig("tiny"))
    mods = ["layers.0.mlp.dense_h_to_4h"]
    with pytest.raises(BadInputError, match=r"another architecture .*hidden_size=256 vs 128"):
        check_query_model(_query_record(tmp_path / "qa", str(wider)), cfg, mods, mods)
    with caplog.at_level("WARNING"):
        check_query_model(_query_record(tmp_path / "qb", str(same)), cfg, mods, mods)
    assert "same architecture, other weights" in caplog.text
    with pytest.raises(BadInputError, match="no rows for module"):
        check_query_model(tmp_path / "qb", cfg, mods, mods + ["embed_out"])
