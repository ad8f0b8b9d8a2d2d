"""The Ray ``hessian`` pipeline: exactness, invariance and fault handling.

Each run fits the tiny default model on 24 corpus documents (KFAC + EK-FAC).
Invariance is checked on the stored sums and eigenvalue grids and, basis-free,
on ``H⁻¹`` applied to random gradients (eigenvectors inside a degenerate
eigenspace are arbitrary, so comparing them entrywise would be meaningless).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import rel

from bergson_ray.errors import StoreError
from bergson_ray.hessians.factored_io import read_factored
from bergson_ray.hessians.preconditioner import load_preconditioner
from bergson_ray.testing.faults import FaultPlan

pytestmark = pytest.mark.ray

BASE = dict(split="train[:24]", window_size=8, overwrite=True, method="kfac", ev_correction=True)
SETTINGS = dict(num_workers=1, num_shards=1, token_batch_size=4096)


def run(tmp, name, faults=None, **kw):
    from bergson_ray.pipelines.hessian import hessian

    return hessian(run_path=str(tmp / name), faults=faults, **{**BASE, **SETTINGS, **kw})


def assert_same_hessian(
    a, b, tol=1e-5, fields=("A", "S", "eigenvalues", "factor_eig_a", "factor_eig_g", "correction")
):
    fa, fb = read_factored(a, with_factors=True), read_factored(b, with_factors=True)
    assert list(fa) == list(fb)
    for m in fa:
        for f in fields:
            x, y = getattr(fa[m], f), getattr(fb[m], f)
            assert (x is None) == (y is None), (m, f)
            if x is not None:
                assert rel(x, y) < tol, (m, f, rel(x, y))
    g = torch.Generator().manual_seed(0)
    for ev in (False, True):
        pa = load_preconditioner(str(a), ev_correction=ev)
        pb = load_preconditioner(str(b), ev_correction=ev)
        for m in fa:
            x = torch.randn(3, pa.module_dim(m), generator=g)
            assert rel(pa.apply_module(m, x), pb.apply_module(m, x)) < 1e-3, (m, ev)


@pytest.fixture(scope="module")
def base_run(ray_session, tiny_assets, tmp_path_factory):
    return run(tmp_path_factory.mktemp("hessian"), "base")


def test_pipeline_factors_equal_in_process_fit(base_run, tiny_assets):
    """The sharded Ray run stores exactly the sums an in-process fitter computes."""
    from bergson_ray.config import (
        BatchConfig,
        DataConfig,
        GradientConfig,
        HessianConfig,
        ModelConfig,
    )
    from bergson_ray.runners.gradient_runner import RunnerSpec
    from bergson_ray.runners.hessian_runner import HessianRunner, HessianSpec

    spec = HessianSpec(
        RunnerSpec(ModelConfig(), GradientConfig(), DataConfig(split="train[:24]"), BatchConfig()),
        HessianConfig(method="kfac"),
    )
    runner = HessianRunner(spec)
    runner.process(list(range(24)))
    state = runner.fitter.state_dicts()
    got = read_factored(base_run, with_factors=True)
    info = json.loads((base_run / "hessian_info.json").read_text())
    assert (
        info["total_processed"]
        == runner.stats["positions"]
        == int(next(iter(state.values()))["count"])
    )
    for m, st in state.items():
        assert rel(got[m].A, st["A"]) < 1e-6 and rel(got[m].S, st["S"]) < 1e-6
    assert (base_run / "total_processed.pt").exists()
    summary = json.loads((base_run / "summary.json").read_text())
    assert summary["shard_restarts"] == 0 and summary["shards"] == 1


@pytest.mark.parametrize(
    "name,kw",
    [
        ("workers2", dict(num_workers=2)),
        ("shards3", dict(num_shards=3)),
        ("tbs256", dict(token_batch_size=256)),
    ],
)
def test_invariance(base_run, tmp_path, name, kw):
    """Factors identical for 1 vs 2 workers, 1 vs 3 shards, token budget 4096 vs 256."""
    other = run(tmp_path, name, **kw)
    assert_same_hessian(base_run, other)
    if name == "shards3":
        assert len(list((other / "activation_sharded").iterdir())) == 3


def test_shampoo_depends_on_batching_by_construction(ray_session, tmp_path):
    """Shampoo sums *batch* gradients' outer products: not token-budget invariant."""
    kw = dict(method="shampoo", ev_correction=False, executor="process")  # math, not Ray
    a = read_factored(run(tmp_path, "s4096", **kw), with_factors=True)
    b = read_factored(run(tmp_path, "s256", token_batch_size=256, **kw), with_factors=True)
    assert max(rel(a[m].S, b[m].S) for m in a) > 0.05


def test_killed_shard_during_accumulation_recovers(base_run, tmp_path):
    faults = FaultPlan(kill_shard=1, kill_shard_at="accumulate")
    out = run(tmp_path, "kill_acc", faults, num_shards=3)
    assert json.loads((out / "summary.json").read_text())["shard_restarts"] == 1
    assert_same_hessian(base_run, out)


def test_killed_shard_holding_data_is_replayed(base_run, tmp_path):
    """Killed while holding merged sums / eigenbases / corrections, one run killing the
    same shard at each of these stages: replaced and replayed every time."""
    stages = "finalize,merge_correction,write"
    out = run(tmp_path, "kill", FaultPlan(kill_shard=2, kill_shard_at=stages), num_shards=3,
              max_shard_restarts=3)  # fmt: skip
    assert json.loads((out / "summary.json").read_text())["shard_restarts"] == 3
    assert_same_hessian(base_run, out)


def test_killed_shard_fails_loudly_without_restarts(ray_session, tmp_path):
    with pytest.raises(StoreError, match="died during"):
        run(
            tmp_path,
            "kill_fail",
            FaultPlan(kill_shard=0, kill_shard_at="merge_factors"),
            num_shards=2,
            max_shard_restarts=0,
        )
    assert not (tmp_path / "kill_fail").exists()  # nothing committed
    part = tmp_path / "kill_fail.part"
    assert not (part / "eigen_activation_sharded").exists()  # and no partial factors written


def test_crashed_worker_windows_rerun(base_run, tmp_path):
    faults = FaultPlan(crash_hessian_worker_after_windows=1, crash_marker=str(tmp_path / "crashed"))
    out = run(tmp_path, "crash", faults, num_workers=2)
    assert (tmp_path / "crashed").exists()
    assert_same_hessian(base_run, out)


def test_autocorrelation_dense_processor_dir(ray_session, tmp_path):
    """Dense Grams of the stored rows, through the CLI; any shard count gives the same."""
    from bergson_ray.cli.main import main
    from bergson_ray.store.processor import load_hessians, load_hessians_eigen

    args = [
        "hessian",
        str(tmp_path / "ac3"),
        "--method",
        "autocorrelation",
        "--projection_dim",
        "8",
        "--split",
        "train[:24]",
        "--window_size",
        "8",
        "--num_shards",
        "3",
        "--executor",  # three shards in process; the Ray pool is test_invariance's subject
        "process",
    ]
    assert main(args) == 0
    one = run(tmp_path, "ac1", method="autocorrelation", ev_correction=False, projection_dim=8)
    assert json.loads((tmp_path / "ac3" / "summary.json").read_text())["executor"] == "process"
    h3, h1 = load_hessians(tmp_path / "ac3"), load_hessians(one)
    assert set(h3) == set(h1) and len(h1) == 16
    for m in h1:
        assert h1[m].shape == (64, 64)
        assert rel(h3[m], h1[m]) < 1e-5
        vals, vecs = load_hessians_eigen(one)[m]
        assert rel((vecs * vals) @ vecs.T, h1[m]) < 1e-4
    assert (one / "processor_config.yaml").exists() and (one / "hessians.safetensors").exists()
    pre = load_preconditioner(str(one))
    assert pre.kind == "dense"
