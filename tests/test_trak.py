"""``trak``: the pipeline against a dense, in-process computation of TRAK's formula.

The reference for one member is computed here without Ray and without the pipeline's
math: projected log-odds gradients of every training and query document (the engine,
whose log-odds gradients are checked against autograd first), the Gram of the
training rows and its inverse by ``torch.linalg.inv``, each document's mean label
probability from its own unpadded forward pass, then
``S = diag(1 - p) Φ G⁻¹ Qᵀ / mean|G⁻¹|``. An ensemble must equal
``mean_m(Φ_m G_m⁻¹ Q_mᵀ / scale_m) · mean_m(1 - p_m)`` of its members computed that way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import anchor
import numpy as np
import pytest
import torch
from helpers import pad_batch, random_docs, tiny_gpt2, tiny_neox

from bergson_ray.config import as_config
from bergson_ray.config.trak import TrakRunConfig
from bergson_ray.errors import BadInputError, RunExistsError

SPLIT, QUERY_SPLIT, N, NQ, P = "train[:12]", "train[:3]", 12, 3, 8
COMMON = dict(
    dataset="tiny",
    split=SPLIT,
    projection_dim=P,
    truncation=True,
    executor="process",  # build/score/p_i stages in process (tests/test_in_process.py)
    # one thread, as each of two Ray workers on 2 CPUs has: bit-equality across executors
    # holds at equal thread counts (on AVX-512 CPUs MKL splits a long reduction, such as
    # the projection's, across threads, which changes its last bits)
    torch_threads=1,
    **{"query.split": QUERY_SPLIT, "query.truncation": True},
)
SEED = 3


def _scores(path) -> np.ndarray:
    from bergson_ray.store.score_store import ScoreStore

    store = ScoreStore.open(path)
    assert store.is_complete()
    return np.asarray(store.scores, np.float64)


def _summary(root) -> dict:
    return json.loads((Path(root) / "trak.json").read_text())


# ------------------------------------------------------------------------ pure math
def test_log_odds_gradients_equal_autograd_and_probabilities_are_direct():
    """The engine's log-odds rows are autograd's gradients of ``-log(p_y / (1 - p_y))``
    summed over tokens (written here from the softmax, not from our loss code), and
    ``mean_label_probability`` is each document's own mean ``p_y``."""
    from bergson_ray.config import GradientConfig
    from bergson_ray.gradients.engine import GradientEngine
    from bergson_ray.gradients.losses import mean_label_probability
    from bergson_ray.gradients.modules import find_target_modules

    model = tiny_neox()
    cfg = GradientConfig(loss_fn="log_odds")
    engine = GradientEngine(model, cfg)
    docs = random_docs((9, 5, 12))
    batch = pad_batch(docs)
    rows = engine.compute(batch).rows
    probs, counts = mean_label_probability(model(batch.input_ids).logits, batch.labels)
    modules = find_target_modules(model, cfg)
    for i, doc in enumerate(docs):
        model.zero_grad()
        model.requires_grad_(True)
        logp = torch.log_softmax(model(doc[None]).logits[0, :-1].float(), -1)
        lp_y = logp.gather(-1, doc[1:, None]).squeeze(-1)
        (-(lp_y - torch.log1p(-lp_y.exp()))).sum().backward()
        want = torch.cat([m.weight.grad.reshape(-1) for m in modules.values()])
        model.requires_grad_(False)
        assert float((rows[i] - want).norm() / want.norm()) < 1e-5
        assert abs(float(probs[i]) - float(lp_y.detach().exp().mean())) < 1e-6
        assert int(counts[i]) == len(doc) - 1


def test_gram_inverse_and_weights_equal_dense_formulas():
    from bergson_ray.hessians.gram import (
        combine_members,
        gram_matrix,
        inverse_gram,
        inverse_scale,
        trak_weights,
        weight_scores,
    )

    g = torch.Generator().manual_seed(0)
    phi, q = torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g)
    gram = gram_matrix(phi[:15], num_rows=16)
    torch.testing.assert_close(gram, phi[:15].T @ phi[:15] / 16)
    torch.testing.assert_close(inverse_gram(gram), torch.linalg.inv(gram), rtol=1e-8, atol=1e-10)
    mu = torch.linalg.eigvalsh(gram).mean()
    torch.testing.assert_close(
        inverse_gram(gram, damping_factor=0.3), torch.linalg.inv(gram + 0.3 * mu * torch.eye(6))
    )
    assert inverse_scale(torch.eye(4)) == pytest.approx(0.25)
    # identity preconditioning: scores are the plain projected dot products, weighted
    probs = torch.rand(20, generator=g, dtype=torch.float64)
    w = trak_weights(probs)
    s = phi @ inverse_gram(torch.eye(6, dtype=torch.float64)) @ q.double().T
    torch.testing.assert_close(
        weight_scores(s, w, 0.5), (phi @ q.double().T) * (1 - probs)[:, None] * 2
    )
    s2, w2 = 3 * s, trak_weights(probs / 2)
    torch.testing.assert_close(
        combine_members([s, s2], [0.5, 4.0], [w, w2]),
        (s / 0.5 + s2 / 4.0) / 2 * ((w + w2) / 2)[:, None],
    )


# --------------------------------------------------------------------- dense reference
def _checkpoint(tiny_assets, root: Path, seed: int) -> str:
    """The tiny model with seeded noise on every weight, saved with its tokenizer: a
    stand-in for an independently trained checkpoint of the same architecture."""
    from transformers import AutoModelForCausalLM

    out = root / f"ckpt{seed}"
    shutil.copytree(tiny_assets.model_dir, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.std().nan_to_num() * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return str(out)


_DENSE: dict = {}


def dense_member(model: str, seed: int, tiny_assets) -> tuple[np.ndarray, np.ndarray, float]:
    """``(Φ G⁻¹ Qᵀ [N, NQ], 1 - p [N], mean|G⁻¹|)`` of one model, in this process."""
    if (model, seed) not in _DENSE:
        _DENSE[model, seed] = _dense_member(model, seed, tiny_assets)
    return _DENSE[model, seed]


def _dense_member(model: str, seed: int, tiny_assets) -> tuple[np.ndarray, np.ndarray, float]:
    from bergson_ray.config import BatchConfig, DataConfig, GradientConfig, ModelConfig
    from bergson_ray.runners.gradient_runner import GradientRunner, RunnerSpec

    grad = GradientConfig(
        projection_dim=P, projection_target="global", loss_fn="log_odds", projection_seed=seed
    )

    def runner(data):
        return GradientRunner(RunnerSpec(ModelConfig(model=model), grad, data, BatchConfig()))

    train = runner(DataConfig(split=SPLIT, truncation=True))
    phi = torch.from_numpy(train.gradients(np.arange(N))["grads"]).double()
    query = runner(
        DataConfig(dataset=str(tiny_assets.query_dir), split=QUERY_SPLIT, truncation=True)
    )
    q = torch.from_numpy(query.gradients(np.arange(NQ))["grads"]).double()
    h_inv = torch.linalg.inv(phi.T @ phi / N)
    probs = []
    with torch.no_grad():
        for doc in train.tokenize(np.arange(N)):
            ids = torch.as_tensor(doc.input_ids)
            logp = torch.log_softmax(train.engine.model(ids[None]).logits[0, :-1].float(), -1)
            probs.append(float(logp.gather(-1, ids[1:, None]).exp().mean()))
    weights = 1.0 - np.asarray(probs)
    return (phi @ h_inv @ q.T).numpy(), weights, float(h_inv.float().abs().mean())


def _assert_close(got: np.ndarray, want: np.ndarray, tol: float = 2e-4) -> None:
    assert got.shape == want.shape
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < tol, err
    assert np.abs(want).max() > 0


# ----------------------------------------------------------------------- Ray runs
@pytest.fixture(scope="module")
def ckpts(tiny_assets, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("ckpts")
    return [_checkpoint(tiny_assets, root, s) for s in (1, 2)]


@pytest.fixture(scope="module")
def single_run(ray_session, ckpts, tmp_path_factory):
    """Member 1 of the ensemble below, alone (its seed), on a pool of two Ray workers."""
    from bergson_ray.pipelines.trak import trak

    root = tmp_path_factory.mktemp("single") / "trak"
    out = trak(run_path=str(root), model=ckpts[1], projection_seed=SEED + 1, num_workers=2,
               **{**COMMON, "executor": "ray"})  # fmt: skip
    return root, out


@pytest.fixture(scope="module")
def ensemble_run(ray_session, ckpts, tmp_path_factory):
    """Both checkpoints on one worker in process; the resume tests below reuse it in file
    order."""
    from bergson_ray.pipelines.trak import trak

    root = tmp_path_factory.mktemp("ensemble") / "trak"
    cfg = dict(run_path=str(root), checkpoints=ckpts, projection_seed=SEED, **COMMON)
    return root, cfg, _scores(trak(**cfg))


def test_single_trak_is_the_dense_formula(single_run, ckpts, tiny_assets):
    from bergson_ray.validation.scores import load_loss_signed

    root, out = single_run
    assert out == root / "scores"
    assert _summary(root)["members"][0]["ran"] == [
        "train",
        "train_probs",
        "train_hessian",
        "query",
        "scores",
    ]
    s, w, scale = dense_member(ckpts[1], SEED + 1, tiny_assets)
    got = _scores(out)
    _assert_close(got, s * w[:, None] / scale)
    np.testing.assert_allclose(np.load(out / "trak_weights.npy"), w, rtol=1e-5, atol=1e-6)
    assert float(np.load(out / "trak_scale.npy")) == pytest.approx(scale, rel=1e-4)
    signed = load_loss_signed(out)  # what `validate --scores` reads: higher is better, negated
    assert signed.negated and np.allclose(signed.matrix, -got)


def test_ensemble_is_the_mean_of_its_members(ensemble_run, single_run, ckpts, tiny_assets):
    from helpers import rows_of

    root, _, got = ensemble_run
    members = [dense_member(c, SEED + i, tiny_assets) for i, c in enumerate(ckpts)]
    want = (
        sum(s / scale for s, _, scale in members)
        / 2
        * np.mean([w for _, w, _ in members], 0)[:, None]
    )
    _assert_close(got, want)
    seeds = [m["projection_seed"] for m in _summary(root)["members"]]
    assert seeds == [SEED, SEED + 1]
    # member 1 on one worker in process == the same model run alone on two Ray workers
    alone, _ = single_run
    np.testing.assert_array_equal(
        rows_of(root / "checkpoint_1" / "train"), rows_of(alone / "train")
    )
    member = root / "checkpoint_1" / "scores"
    w, scale = np.load(member / "trak_weights.npy"), float(np.load(member / "trak_scale.npy"))
    _assert_close(_scores(member) * w[:, None] / scale, _scores(alone / "scores"), tol=1e-6)


def test_resume_skips_finished_members(ensemble_run):
    from bergson_ray.pipelines.trak import STEPS, trak

    root, cfg, first = ensemble_run
    with pytest.raises(RunExistsError, match="--resume"):
        trak(**cfg)
    dirs = [root / f"checkpoint_{i}" / s for i in (0, 1) for s in STEPS] + [root / "scores"]
    mtimes = {d: os.stat(d).st_mtime_ns for d in dirs}
    trak(resume=True, **cfg)  # everything finished: no worker starts, nothing is rewritten
    summary = _summary(root)
    assert [m["ran"] for m in summary["members"]] == [[], []]
    assert summary["reused"] == ["scores"]
    assert {d: os.stat(d).st_mtime_ns for d in dirs} == mtimes

    shutil.rmtree(root / "checkpoint_1" / "scores")  # member 1 interrupted before its scores
    shutil.rmtree(root / "scores")
    again = _scores(trak(resume=True, **cfg))
    summary = _summary(root)
    assert summary["members"][0]["ran"] == [] and summary["members"][1]["ran"] == ["scores"]
    np.testing.assert_allclose(again, first, rtol=1e-6)

    with pytest.raises(BadInputError, match="other settings") as err:
        trak(resume=True, **{**cfg, "damping_factor": 0.5})
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- bad input
def test_trak_needs_a_projection_and_log_odds():
    cfg = as_config(TrakRunConfig)
    assert (cfg.grad.projection_dim, cfg.grad.loss_fn, cfg.grad.projection_target) == (
        16, "log_odds", "global",
    )  # fmt: skip
    assert cfg.preprocess.damping_factor == 0.0 and cfg.stats_sample_size is None
    for kw, msg in [
        ({"projection_dim": 0}, "--projection_dim must be > 0"),
        ({"loss_fn": "ce"}, "--loss_fn log_odds"),
        ({"projection_target": "per_module"}, "--projection_target global"),
        ({"hessian_path": "h"}, "fits its own Gram"),
    ]:
        with pytest.raises(BadInputError, match=msg) as err:
            as_config(TrakRunConfig, run_path="x", **kw)
        assert "\n" not in str(err.value)


def test_checkpoints_of_different_architectures_fail_before_any_step(ckpts, tmp_path):
    from bergson_ray.pipelines.trak import trak

    other = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(other)
    root = tmp_path / "trak"
    with pytest.raises(BadInputError, match="different architectures") as err:
        trak(run_path=str(root), checkpoints=[ckpts[0], str(other)], **COMMON)
    assert "\n" not in str(err.value)
    assert not root.exists()


def test_empty_query_set_fails_before_any_step(tmp_path):
    from bergson_ray.pipelines.trak import trak

    root = tmp_path / "trak"
    with pytest.raises(BadInputError, match="has no rows") as err:
        trak(run_path=str(root), **{**COMMON, "query.split": "train[3:3]"})
    assert "\n" not in str(err.value)
    assert not root.exists()


def test_cli_flags_make_the_config():
    import argparse

    from bergson_ray.cli import trak as cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "trak",
            "out",
            "--checkpoints",
            "a,b",
            "--stats_sample_size",
            "5",
            "--damping_factor",
            "0.1",
        ]
    )
    cfg = cli.config_from_args(args)
    assert cfg.checkpoints == ["a", "b"] and cfg.stats_sample_size == 5
    assert cfg.preprocess.damping_factor == 0.1 and cfg.run.run_path == "out"
    with pytest.raises(BadInputError, match="projection_dim"):
        cli.config_from_args(parser.parse_args(["trak", "out", "--projection_dim", "0"]))


# ------------------------------------------------------------------ bergson interop
@anchor.needs_anchor
def test_scores_match_bergsons_trak(ray_session, tmp_path):
    """bergson's own ``trak`` on its tiny model and data (cached), against ours."""
    from bergson_ray.pipelines.trak import trak

    data = anchor.DATA
    cached = anchor.RUNS / "trak_p8"
    if not (cached / "scores" / "info.json").exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        proc = anchor.run(
            ["bergson", "trak", cached, "--model", anchor.MODEL,
             "--data.dataset", data / "pydoc", "--data.split", SPLIT,
             "--data.truncation", "true",
             "--query.dataset", data / "pydoc_query", "--query.split", QUERY_SPLIT,
             "--query.truncation", "true", "--projection_dim", str(P), "--loss_fn", "log_odds",
             "--projection_target", "global", "--overwrite", "true"],
            cwd=cached.parent,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    ours = trak(
        run_path=str(tmp_path / "trak"), model=str(anchor.MODEL), dataset=str(data / "pydoc"),
        split=SPLIT, truncation=True, projection_dim=P, num_workers=1,
        **{"query.dataset": str(data / "pydoc_query"), "query.split": QUERY_SPLIT,
           "query.truncation": True},
    )  # fmt: skip
    # bergson sums the Gram in fp32, we in fp64; the inverse amplifies that a little
    _assert_close(_scores(ours), _scores(cached / "scores"), tol=1e-4)
    np.testing.assert_allclose(
        np.load(ours / "trak_weights.npy"),
        np.load(cached / "scores" / "trak_weights.npy"),
        atol=1e-6,
    )
