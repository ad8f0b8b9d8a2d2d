"""``mix``: bergson's λ rule by hand, the mixed files, and who can read them. No Ray."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import anchor
import pytest
import torch

from bergson_ray.errors import BadInputError
from bergson_ray.hessians.mix import choose_lambda, mix_hessians
from bergson_ray.store.processor import (
    NormalizerState,
    ProcessorConfig,
    load_hessians,
    load_processor,
    save_processor,
)
from bergson_ray.store.run_dir import RunDir


def diag(*values: float) -> torch.Tensor:
    return torch.diag(torch.tensor(values, dtype=torch.float32))


# ------------------------------------------------------------------------- the λ rule


def test_lambda_by_hand():
    query = {"a": diag(3, 0), "b": diag(5)}
    train = {"a": diag(1, 1), "b": diag(4)}
    # pooled, descending: query [5, 3, 0], train [4, 1, 1]
    c = choose_lambda(query, train, 1)
    assert c.reason == "crossing" and c.k == 1 and c.total == 3
    assert c.lam == pytest.approx(4 / 9)
    assert choose_lambda(query, train, 2).lam == pytest.approx(1 / 4)
    c3 = choose_lambda(query, train, 3)  # query's 3rd eigenvalue is 0: λ = 1
    assert c3.lam == 1.0 and c3.query_rank == 2 and c3.query_rank_deficient
    assert choose_lambda(query, train, 1000).k == 3  # clamped to the pooled count
    assert not choose_lambda(query, train, 2).query_rank_deficient


def test_lambda_fallbacks():
    q, t = {"a": diag(2, 1)}, {"a": diag(1, 1)}
    assert choose_lambda(q, t, 0).lam == 1.0  # nothing to downweight
    assert choose_lambda(q, {"other": diag(1)}, 1).lam == 0.99  # no common module
    assert choose_lambda({"a": diag(0, 0)}, {"a": diag(0, 0)}, 1).lam == 0.99  # 0 / 0
    # negative round-off eigenvalues count as 0, as in bergson
    assert choose_lambda({"a": diag(-1e-9, 2)}, {"a": diag(1, 1)}, 2).lam == 1.0


def test_mix_at_lambda_zero_and_one_is_each_input():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 6, generator=g), torch.randn(6, 6, generator=g)
    q, t = {"m": x @ x.T}, {"m": y @ y.T}
    assert torch.equal(mix_hessians(q, t, 1.0)["m"], q["m"])
    assert torch.equal(mix_hessians(q, t, 0.0)["m"], t["m"])
    assert torch.allclose(mix_hessians(q, t, 0.25)["m"], 0.25 * q["m"] + 0.75 * t["m"])


# ------------------------------------------------------------------------ the pipeline


def hessian_dir(path: Path, hessians: dict, *, method="autocorrelation", p=2, normalizers=None):
    """A dense Hessian run dir as ``hessian --method autocorrelation`` leaves it."""
    run = RunDir(path)
    save_processor(
        run.part,
        ProcessorConfig(projection_dim=p),
        hessians=hessians,
        hessians_eigen={k: torch.linalg.eigh(v) for k, v in hessians.items()},
        normalizers=normalizers,
    )
    run.write_config({"hessian": {"method": method}}, command="hessian")
    return run.commit()


@pytest.fixture
def pair(tmp_path):
    adam = {"m": NormalizerState("AdamNormalizer", {"weight_avg_sq": torch.ones(2, 2)})}
    q = hessian_dir(
        tmp_path / "q", {"m": diag(4, 3, 2, 1), "n": diag(1, 1, 0, 0)}, normalizers=adam
    )
    t = hessian_dir(tmp_path / "t", {"m": diag(2, 2, 2, 2), "n": diag(3, 0, 0, 0)})
    return q, t


def _mix(tmp_path, q, t, k, name="out"):
    from bergson_ray.pipelines.mix import mix

    return mix(
        query_path=str(q),
        index_path=str(t),
        output_path=str(tmp_path / name),
        target_downweight_components=k,
    )


def test_mix_writes_a_dense_hessian_our_loader_reads(tmp_path, pair):
    from bergson_ray.hessians.preconditioner import DensePreconditioner, load_preconditioner

    q, t = pair
    out = _mix(tmp_path, q, t, 2)  # pooled query [4,3,2,1,1,1,0,0], train [3,2,2,2,2,0,0,0]
    lam = 2 / (3 + 2)
    got = load_hessians(out)
    for name in ("m", "n"):
        want = lam * load_hessians(q)[name] + (1 - lam) * load_hessians(t)[name]
        assert torch.allclose(got[name], want)
    state = load_processor(out)
    assert state.config == load_processor(q).config  # the query's settings, as bergson
    assert set(state.normalizers) == {"m"}  # and the query's normalizers
    values, vectors = state.hessians_eigen["m"]
    assert torch.allclose((vectors * values) @ vectors.T, got["m"], atol=1e-6)
    pre = load_preconditioner(str(out))
    assert isinstance(pre, DensePreconditioner) and set(pre.modules) == {"m", "n"}
    for f in ("hessians.pth", "hessians_eigen.pth", "normalizers.pth", "config.yaml"):
        assert (out / f).is_file()


def test_mix_at_the_extremes_reproduces_each_input(tmp_path, pair):
    q, t = pair
    one = _mix(tmp_path, q, t, 0, "one")  # k <= 0: λ = 1, the query Hessian
    assert all(torch.equal(v, load_hessians(q)[k]) for k, v in load_hessians(one).items())
    # k = 6: σ_query = 1, σ_train = 0 -> λ = 0, the training Hessian
    zero = _mix(tmp_path, q, t, 6, "zero")
    assert all(torch.equal(v, load_hessians(t)[k]) for k, v in load_hessians(zero).items())


def test_rank_deficient_query_warns(tmp_path, caplog):
    q = hessian_dir(tmp_path / "q1", {"m": diag(4, 0, 0, 0)})  # one query row: rank 1
    t = hessian_dir(tmp_path / "t1", {"m": diag(1, 1, 1, 1)})
    with caplog.at_level(logging.WARNING, logger="bergson_ray.pipelines.mix"):
        _mix(tmp_path, q, t, 2)
    assert "rank 1 < target_downweight_components 2" in caplog.text
    assert "lambda = 1.000" in caplog.text and "--mix_hessians false" in caplog.text


def test_mix_refuses_what_it_cannot_mix(tmp_path, pair):
    q, t = pair
    kfac = hessian_dir(tmp_path / "k", {"m": diag(1, 1, 1, 1)}, method="kfac")
    with pytest.raises(BadInputError, match="kfac Hessian; mix needs autocorrelation"):
        _mix(tmp_path, kfac, t, 2)
    other = hessian_dir(tmp_path / "p", {"m": diag(1), "n": diag(1)}, p=1)
    with pytest.raises(BadInputError, match="other projection settings"):
        _mix(tmp_path, q, other, 2)
    partial = hessian_dir(tmp_path / "o", {"m": diag(1, 1, 1, 1)})
    with pytest.raises(BadInputError, match="no module 'n'"):
        _mix(tmp_path, q, partial, 2)
    empty = tmp_path / "e"
    empty.mkdir()
    with pytest.raises(BadInputError, match="holds no Hessian"):
        _mix(tmp_path, empty, t, 2)


def test_mix_cli_takes_bergsons_flags(tmp_path, pair, capsys):
    from bergson_ray.cli import mix as cli

    q, t = pair
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "mix",
            "--query_path",
            str(q),
            "--index_path",
            str(t),
            "--output_path",
            str(tmp_path / "cli"),
            "--target_downweight_components",
            "2",
        ]
    )
    assert args.func(args) == 0
    assert "mixed Hessian written to" in capsys.readouterr().out
    assert (tmp_path / "cli" / "hessians.safetensors").is_file()
    with pytest.raises(BadInputError, match="--output_path is required"):
        cli.config_from_args(
            parser.parse_args(["mix", "--query_path", str(q), "--index_path", str(t)])
        )


@anchor.needs_venv
def test_bergson_loads_the_mixed_hessian(tmp_path, pair):
    q, t = pair
    out = _mix(tmp_path, q, t, 2)
    code = (
        "import json, sys\n"
        "from bergson.gradients import GradientProcessor\n"
        "p = GradientProcessor.load(sys.argv[1])\n"
        "print(json.dumps([p.projection_dim, sorted(p.hessians), p.hessians['m'].tolist()]))\n"
    )
    proc = anchor.run(["python", "-c", code, out], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dim, names, m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert dim == 2 and names == ["m", "n"]
    assert torch.allclose(torch.tensor(m), load_hessians(out)["m"])
