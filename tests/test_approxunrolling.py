"""``approxunrolling`` (SOURCE): the math against dense matrices, the pipeline against the
in-process EK-FAC fit of a checkpoint, 1 vs 2 workers, resume, the Adam variant, bad input.

The identity the single-checkpoint test states: with one segment holding one checkpoint,
SOURCE is EK-FAC influence at that checkpoint with the damped inverse ``1/(λ + cμ)``
replaced by ``F_segment(λ) = (1 - exp(-ηK λ)) / λ``, ``ηK`` the learning rates summed
over training, stored loss-signed::

    score(z, q) = -⟨g(z), Q_G (F_segment(Λ*) ⊙ Q_Gᵀ q Q_A) Q_Aᵀ⟩

with ``(Q_G, Q_A, Λ*)`` the checkpoint's own EK-FAC fit (``hessian --ev_correction``:
per-document mean eigenvalues). (For ``ηK λ >> 1`` this is ``-g·H⁻¹q``, the undamped
influence function.) The same model and data, run through bergson 2.5.1's own
``approxunrolling``, agree with ours to 3e-7 (SGD) and 5e-6 (Adam) relative
(``docs/methods/approxunrolling.md``).

The model is a 2-layer GPT-NeoX (hidden 32) trained 4 AdamW steps by ``bergson-ray
train`` on 16 tiny-corpus documents, saving ``step_2`` and ``step_4``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import rel

from bergson_ray.errors import BadInputError, RunExistsError

N_DOCS, N_QUERIES = 16, 3
COMMON = dict(
    dataset="tiny",
    split=f"train[:{N_DOCS}]",
    truncation=True,
    token_batch_size=64,
    num_workers=1,
    torch_threads=1,
    **{"query.split": f"train[:{N_QUERIES}]", "query.truncation": True},
)


# ------------------------------------------------------------------------- pure math


def _random_segment(seed: int, o: int = 3, i: int = 4, docs: tuple[int, ...] = (5, 7)):
    """Per-checkpoint covariance sums and per-sequence gradients of one module."""
    g = torch.Generator().manual_seed(seed)
    ckpts = []
    for n in docs:
        a = torch.randn(n, 6, i, generator=g, dtype=torch.float64)
        s = torch.randn(n, 6, o, generator=g, dtype=torch.float64)
        ckpts.append((a, s))
    return ckpts


def _fit_segment(ckpts):
    """Our aggregation: pooled factors -> eigenbasis -> per-checkpoint lambdas -> σ."""
    from bergson_ray.hessians.accumulator import Factors
    from bergson_ray.hessians.ev_correction import EigenCorrectionAccumulator
    from bergson_ray.unrolling.aggregation import segment_factors, segment_lambdas, with_correction

    per = [
        {"m": Factors(torch.einsum("nsi,nsj->ij", a, a), torch.einsum("nso,nsp->op", s, s),
                      a.shape[0] * a.shape[1])}  # fmt: skip
        for a, s in ckpts
    ]
    docs = [a.shape[0] for a, _ in ckpts]
    kf = segment_factors(per, docs, dtype=torch.float64)
    lams = []
    for a, s in ckpts:
        acc = EigenCorrectionAccumulator(kf["m"].q_a, kf["m"].q_g, dtype=torch.float64)
        acc.update(a, s, None)
        lams.append({"m": acc.finalize()})
    return with_correction(kf, segment_lambdas(lams, docs, dtype=torch.float64))["m"]


def _dense_segment(ckpts):
    """The same segment Hessian from scratch with Kronecker products."""
    a_all = torch.cat([a.reshape(-1, a.shape[-1]) for a, _ in ckpts])
    s_all = torch.cat([s.reshape(-1, s.shape[-1]) for _, s in ckpts])
    n = a_all.shape[0]
    _, qa = torch.linalg.eigh(a_all.T @ a_all / n)
    _, qg = torch.linalg.eigh(s_all.T @ s_all / n)
    q = torch.kron(qg, qa)  # acts on row-major vec of an [O, I] gradient
    grads = torch.cat([torch.einsum("nso,nsi->noi", s, a).reshape(a.shape[0], -1) for a, s in ckpts])
    sigma = ((grads @ q) ** 2).mean(0)  # per-document mean of the rotated squared gradients
    return q, sigma


def test_segment_aggregation_is_the_dense_pooled_fisher():
    from bergson_ray.hessians.factored import recompose
    from bergson_ray.unrolling.adam import diag_hessian

    ckpts = _random_segment(0)
    kf = _fit_segment(ckpts)
    q, sigma = _dense_segment(ckpts)
    dense = (q * sigma) @ q.T
    torch.testing.assert_close(recompose(kf, ev_correction=True), dense, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(diag_hessian(kf).reshape(-1), dense.diagonal(), rtol=1e-9, atol=1e-12)


def _matrix_function(h: torch.Tensor, fn) -> torch.Tensor:
    lam, v = torch.linalg.eigh(h)
    return (v * fn(lam)) @ v.T


@pytest.mark.parametrize("adam", [False, True])
def test_walk_matches_dense_matrix_functions(adam):
    """Two segments: phase 1 and 2 against ``expm`` / ``(I - expm(-tH)) H⁻¹`` of the dense
    segment Hessians (SGD), and against Eq. 43's diagonal hybrid with a damped dense
    inverse (Adam)."""
    from bergson_ray.hessians.factored import recompose
    from bergson_ray.unrolling.walk import Segment, SegmentOperator, walk

    t = [0.7, 1.9]
    kfs = [_fit_segment(_random_segment(s)) for s in (1, 2)]
    hs = [recompose(kf, ev_correction=True) for kf in kfs]
    g = torch.Generator().manual_seed(3)
    p = [torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.5 for _ in kfs] if adam else [None, None]
    ops = [SegmentOperator(Segment({"m": kf}, tl, {"m": pl} if adam else None)) for kf, tl, pl in zip(kfs, t, p)]  # fmt: skip
    q = torch.randn(2, 12, generator=g, dtype=torch.float64)
    walked, transformed = walk({"m": q}, ops)

    if not adam:
        q0 = q @ torch.linalg.matrix_exp(-t[1] * hs[1])  # symmetric: row form of expm(-tH) q
        seg = [_matrix_function(h, lambda x, tl=tl: -torch.expm1(-tl * x) / x) for h, tl in zip(hs, t)]
        want = [q0 @ seg[0], q @ seg[1]]
    else:
        sig = [(pl.reshape(-1) * h.diagonal()) for pl, h in zip(p, hs)]
        q0 = q * torch.exp(-t[1] * sig[1])
        inv = [
            _matrix_function(h, lambda x, kf=kf: 1 / (x + 0.1 * kf.correction.double().mean()))
            for h, kf in zip(hs, kfs)
        ]
        want = [(q0 * -torch.expm1(-t[0] * sig[0])) @ inv[0], (q * -torch.expm1(-t[1] * sig[1])) @ inv[1]]
    torch.testing.assert_close(walked[0]["m"].double(), q0, rtol=1e-4, atol=1e-6)
    for got, exp in zip(transformed, want):
        torch.testing.assert_close(got["m"].double(), exp, rtol=1e-4, atol=1e-6)


def test_eigenfunctions_and_segment_learning_rates():
    from bergson_ray.unrolling.eigenfunctions import f_backward, f_segment
    from bergson_ray.unrolling.segments import (
        checkpoint_step,
        lr_times_steps,
        lr_times_steps_from_lists,
        segment_boundaries,
        segment_indices,
        step_to_lr,
    )

    x = torch.tensor([0.0, 1e-12, 0.5, 3.0], dtype=torch.float64)
    torch.testing.assert_close(f_segment(2.0)(x)[0], torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(f_segment(2.0)(x)[2:], (1 - torch.exp(-2 * x[2:])) / x[2:])
    torch.testing.assert_close(f_segment(2.0)(x)[1], torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(f_backward(2.0)(x), torch.exp(-2 * x))

    assert [checkpoint_step(p) for p in ("a/checkpoint-12", "step_3.ckpt", "step_4", "7", "x")] == [12, 3, 4, 7, None]
    assert segment_indices(6, 3) == [[0, 1], [2, 3], [4, 5]]
    history = step_to_lr([{"step": s, "learning_rate": 0.1 * s} for s in range(1, 7)] + [{"eval": 1}])
    bounds = segment_boundaries([2, 4, 5, 6], 2)
    assert bounds == [0, 4, 6]
    np.testing.assert_allclose(lr_times_steps(bounds, history, 0.5), [2 * (0.1 + 0.2 + 0.3 + 0.4), 2 * 1.1])
    np.testing.assert_allclose(lr_times_steps_from_lists([1e-3, 2e-3], [10, 5], 0.0), [1e-2, 1e-2])
    with pytest.raises(BadInputError, match="cannot be split into 3"):
        segment_indices(4, 3)
    with pytest.raises(BadInputError, match="training order"):
        segment_boundaries([4, 2], 2)


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained 4 AdamW steps, states saved at steps 0, 2 and 4."""
    from helpers import tiny_neox

    from bergson_ray.defaults.tiny import load_tiny_tokenizer
    from bergson_ray.pipelines.train import train

    root = tmp_path_factory.mktemp("au_train")
    tok = load_tiny_tokenizer()
    tiny_neox(vocab=len(tok)).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    run = train(
        run_path=str(root / "run"), model=str(root / "base"), dataset="tiny",
        split=f"train[:{N_DOCS}]", truncation=True, batch_size=4, lr=1e-3,
        save_mode="interval", save_interval=2, torch_threads=1, save_models=False,
    )  # fmt: skip
    return Path(run)


def _ckpt(trained, step: int) -> str:
    return str(trained / "checkpoints" / f"step_{step}.ckpt")


def _scores(path) -> np.ndarray:
    from bergson_ray.store.score_store import ScoreStore

    store = ScoreStore.open(path)
    assert store.is_complete() and store.higher_is_better is False
    return np.asarray(store.scores, np.float64)


def _summary(root) -> dict:
    return json.loads((root / "approxunrolling.json").read_text())


def _runner(model_dir, split: str, dataset: str = "tiny"):
    from bergson_ray.config import BatchConfig, DataConfig, GradientConfig, ModelConfig
    from bergson_ray.runners.gradient_runner import GradientRunner, RunnerSpec

    return GradientRunner(RunnerSpec(
        ModelConfig(model=str(model_dir)), GradientConfig(),
        DataConfig(dataset=dataset, split=split, truncation=True), BatchConfig(token_batch_size=64),
    ))  # fmt: skip


_GRADS: dict[tuple, torch.Tensor] = {}


def _grads(model_dir, n: int, query: bool = False) -> torch.Tensor:
    """Full gradients at an exported checkpoint, in process (cached: the runs of this file
    export identical checkpoint-<N> dirs)."""
    from bergson_ray.defaults.tiny import ensure_tiny_assets

    key = (model_dir.name, n, query)
    if key not in _GRADS:
        data = str(ensure_tiny_assets().query_dir) if query else "tiny"
        runner = _runner(model_dir, f"train[:{n}]", data)
        _GRADS[key] = torch.from_numpy(runner.gradients(np.arange(n))["grads"]).double()
    return _GRADS[key]


def _apply(factors, rows: torch.Tensor, layout: dict, fn) -> torch.Tensor:
    """Q_G (fn(Λ*) ⊙ Q_Gᵀ G Q_A) Q_Aᵀ for every module block, written out with einsum."""
    from bergson_ray.utils.columns import column_offsets

    out = []
    for name, (lo, hi) in column_offsets(layout).items():
        kf = factors[name]
        qg, qa = kf.q_g.double(), kf.q_a.double()
        g = rows[:, lo:hi].reshape(len(rows), qg.shape[0], qa.shape[0])
        r = torch.einsum("oa,noi,ib->nab", qg, g, qa) * fn(kf.correction.double())
        out.append(torch.einsum("oa,nab,ib->noi", qg, r, qa).reshape(len(rows), -1))
    return torch.cat(out, dim=1)


def _lr_sum(trained, lo: int, hi: int) -> float:
    history = json.loads((trained / "checkpoints" / "log_history.json").read_text())
    return sum(h["learning_rate"] for h in history if lo < h["step"] <= hi)


# ------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def two_segments(ray_session, trained, tmp_path_factory):
    """Two segments of one checkpoint each, on 2 workers, rows in 2 chunks per checkpoint."""
    from bergson_ray.pipelines.approxunrolling import approxunrolling

    root = tmp_path_factory.mktemp("au_two") / "src"
    kw = dict(checkpoints=[str(trained)], segments=2, window_size=8, **{**COMMON, "num_workers": 2})
    approxunrolling(run_path=str(root), **kw)
    return root, kw


def test_one_checkpoint_segment_is_ekfac_influence_with_f_segment(two_segments, trained):
    """The identity in the module docstring. Segment 1 of the run holds one checkpoint,
    the final one, where the query is taken: its factors must be that checkpoint's EK-FAC
    fit (here the hessian pipeline's own runner and fitter, in process) and its scores
    ``⟨g, Q_G (F_segment(Λ*) ⊙ Q_Gᵀ q Q_A) Q_Aᵀ⟩``. With L = C = 1 SOURCE's score is
    minus exactly this (one term in the sum over segments; the sum is checked below)."""
    from bergson_ray.config import (
        BatchConfig,
        DataConfig,
        GradientConfig,
        HessianConfig,
        ModelConfig,
    )
    from bergson_ray.hessians.accumulator import Factors
    from bergson_ray.hessians.factored import fit_kronecker, recompose
    from bergson_ray.hessians.factored_io import read_factored
    from bergson_ray.runners.gradient_runner import RunnerSpec
    from bergson_ray.runners.hessian_runner import HessianRunner, HessianSpec
    from bergson_ray.store.score_store import ScoreStore
    from bergson_ray.unrolling.eigenfunctions import f_segment

    root, _ = two_segments
    model = root / "exported" / "checkpoint-4"
    hess = HessianRunner(HessianSpec(
        RunnerSpec(ModelConfig(model=str(model)), GradientConfig(),
                   DataConfig(split=f"train[:{N_DOCS}]", truncation=True), BatchConfig(token_batch_size=64)),
        HessianConfig(method="kfac", ev_correction=True),
    ))  # fmt: skip
    hess.process(np.arange(N_DOCS))
    kfs = {
        m: fit_kronecker(Factors(st["A"], st["S"], int(st["count"])), num_documents=N_DOCS)
        for m, st in hess.contributions([hess.modules])[0].items()
    }  # fmt: skip
    hess.start_correction({m: (kf.q_a, kf.q_g) for m, kf in kfs.items()})
    hess.process(np.arange(N_DOCS))
    for m, st in hess.contributions([hess.modules])[0].items():
        kfs[m].correction = st["lambda"] / N_DOCS

    stored = read_factored(root / "segment_1" / "kfac")
    name = "layers.1.attention.dense"  # the EK-FAC Hessian itself (eigenvector signs drop out)
    assert rel(recompose(stored[name], True), recompose(kfs[name], True)) < 1e-4

    eta_k = _lr_sum(trained, 2, 4)
    q = _grads(model, N_QUERIES, query=True)
    _GRADS.setdefault((model.name, N_DOCS, False), torch.from_numpy(
        hess.base.gradients(np.arange(N_DOCS))["grads"]).double())  # fmt: skip
    want = (_grads(model, N_DOCS) @ _apply(kfs, q, hess.base.engine.grad_sizes, f_segment(eta_k)).T).numpy()
    got = np.asarray(ScoreStore.open(root / "segment_1" / "scores_ckpt_0").scores, np.float64)
    assert got.shape == (N_DOCS, N_QUERIES) and np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_two_segments_match_the_dense_walk_and_validate_reads_them(two_segments, trained):
    """Stored segment factors -> q walked back and F_segment'd by hand -> -Σ_l ⟨g_l, q̃_l⟩;
    the store is what validate reads (loss-signed, not negated again)."""
    from bergson_ray.hessians.factored_io import read_factored
    from bergson_ray.store.gradient_store import GradientStore
    from bergson_ray.unrolling.eigenfunctions import f_backward, f_segment
    from bergson_ray.validation.scores import load_loss_signed

    root, _ = two_segments
    summary = _summary(root)
    t = [_lr_sum(trained, 0, 2), _lr_sum(trained, 2, 4)]
    assert summary["lr_times_steps"] == pytest.approx(t) and summary["variant"] == "sgd"
    models = [root / "exported" / "checkpoint-2", root / "exported" / "checkpoint-4"]
    segs = [read_factored(root / f"segment_{s}" / "kfac") for s in (0, 1)]
    layout = GradientStore.open(root / "query").grad_sizes
    q1 = _grads(models[1], N_QUERIES, query=True)
    q0 = _apply(segs[1], q1, layout, f_backward(t[1]))
    qt = [_apply(segs[0], q0, layout, f_segment(t[0])), _apply(segs[1], q1, layout, f_segment(t[1]))]
    for s in (0, 1):
        stored = GradientStore.open(root / f"segment_{s}" / "query_grad_segment")
        np.testing.assert_allclose(stored.rows(np.arange(N_QUERIES)).numpy(), qt[s].numpy(),
                                   rtol=1e-4, atol=1e-4 * qt[s].abs().max().item())  # fmt: skip
    want = -sum((_grads(m, N_DOCS) @ qs.T).numpy() for m, qs in zip(models, qt))
    np.testing.assert_allclose(_scores(root / "scores"), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())

    loaded = load_loss_signed(root / "scores")
    assert loaded.negated is False and loaded.matrix.shape == (N_DOCS, N_QUERIES)


def test_resume_on_one_worker_skips_finished_fits_and_reproduces_two_workers(two_segments, tmp_path):
    """Checkpoint 1's factor fit is lost: --resume with 1 worker recomputes it and what is
    made from it, reuses checkpoint 0's fits, and every recomputed file is byte for byte
    what 2 workers wrote (chunks are summed in order, whoever computed them)."""
    from bergson_ray.pipelines.approxunrolling import approxunrolling

    base, kw = two_segments
    root = tmp_path / "src"
    shutil.copytree(base, root)
    with pytest.raises(RunExistsError, match="--resume"):
        approxunrolling(run_path=str(root), **kw)

    shutil.rmtree(root / "segment_1" / "ckpt_0" / "kfac")
    shutil.rmtree(root / "scores")
    approxunrolling(run_path=str(root), resume=True, **{**kw, "num_workers": 1})
    summary = _summary(root)
    assert summary["workers"] == 1
    for piece in ("query", "segment_0/ckpt_0/kfac", "segment_0/ckpt_0/kfac/averaged_ev_correct_sharded",
                  "segment_0/kfac", "segment_0/kfac/eigenvalue_correction_sharded"):  # fmt: skip
        assert piece in summary["reused"], piece
    assert summary["ran"][:4] == [
        "segment_1/ckpt_0/kfac", "segment_1/kfac",
        "segment_1/ckpt_0/kfac/averaged_ev_correct_sharded", "segment_1/kfac/eigenvalue_correction_sharded",
    ]  # fmt: skip
    assert summary["jobs"] == 2 + 2 + 2 * 2  # checkpoint 1's two fits, both checkpoints' scores
    recomputed = [
        "segment_1/ckpt_0/kfac/activation_sharded/shard_0.safetensors",
        "segment_1/ckpt_0/kfac/averaged_ev_correct_sharded/shard_0.safetensors",
        "segment_1/kfac/eigen_gradient_sharded/shard_0.safetensors",
        "segment_1/kfac/eigenvalue_correction_sharded/shard_0.safetensors",
        "segment_0/query_grad_segment/gradients.bin",
        "segment_0/scores_ckpt_0/scores.bin",
        "segment_1/scores_ckpt_0/scores.bin",
        "scores/scores.bin",
    ]
    for rel_path in recomputed:
        assert (root / rel_path).read_bytes() == (base / rel_path).read_bytes(), rel_path

    with pytest.raises(BadInputError, match="--segments: started with 2, now 1"):
        approxunrolling(run_path=str(root), resume=True, **{**kw, "segments": 1})


def test_adam_variant_uses_each_checkpoints_second_moments(ray_session, trained, tmp_path):
    """One segment of two checkpoints: P from the bias-corrected mean of the two states'
    second moments; q̃ = H⁻¹((1 - exp(-tσ)) ⊙ q) with σ = P ⊙ diag(H); scores averaged
    over both checkpoints."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from bergson_ray.hessians.factored_io import read_factored
    from bergson_ray.hessians.preconditioner import FactoredPreconditioner
    from bergson_ray.pipelines.approxunrolling import approxunrolling
    from bergson_ray.store.gradient_store import GradientStore
    from bergson_ray.unrolling.adam import diag_hessian
    from bergson_ray.utils.columns import column_offsets

    root = tmp_path / "src"
    approxunrolling(run_path=str(root), checkpoints=[_ckpt(trained, 2), _ckpt(trained, 4)],
                    segments=1, use_adam_preconditioner=True, **COMMON)  # fmt: skip
    assert _summary(root)["variant"] == "adam"

    v_hat = []
    for step in (2, 4):
        with safe_open(str(trained / "checkpoints" / f"step_{step}.ckpt" / "trainer_state.safetensors"), "pt") as f:
            assert int(f.metadata()["step"]) == step
            v_hat.append({k.split("/", 1)[1]: f.get_tensor(k).double() / (1 - 0.975**step)
                          for k in f.keys() if k.startswith("exp_avg_sq/")})  # fmt: skip
    grids = load_file(str(root / "segment_0" / "preconditioner.safetensors"))
    name = "layers.0.mlp.dense_4h_to_h"
    v = (v_hat[0][f"gpt_neox.{name}.weight"] + v_hat[1][f"gpt_neox.{name}.weight"]) / 2
    torch.testing.assert_close(grids[name].double(), 1 / ((v + 1e-17).sqrt() + 1e-8), rtol=1e-5, atol=0)

    factors = read_factored(root / "segment_0" / "kfac")
    inverse = FactoredPreconditioner(factors, ev_correction=True)
    layout = GradientStore.open(root / "query").grad_sizes
    models = [root / "exported" / "checkpoint-2", root / "exported" / "checkpoint-4"]
    q = _grads(models[1], N_QUERIES, query=True)
    t = _lr_sum(trained, 0, 4)
    blocks = []
    for m, (lo, hi) in column_offsets(layout).items():
        sigma = (grids[m].double() * diag_hessian(factors[m])).reshape(-1)
        masked = (q[:, lo:hi] * -torch.expm1(-t * sigma)).float()
        blocks.append(inverse.apply_module(m, masked, -1.0).double())
    qt = torch.cat(blocks, dim=1)
    want = -sum((_grads(m, N_DOCS) @ qt.T).numpy() for m in models) / 2
    got = _scores(root / "scores")
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra, words",
    [
        (dict(checkpoints=[]), "no checkpoints given"),
        (dict(checkpoints=["/nonexistent/ckpt"]), "does not exist"),
        (dict(segments=3), "2 checkpoints cannot be split into 3 equal segments"),
        (dict(**{"query.split": "train[3:3]"}), "no rows"),
        (dict(lr_list=[1e-3]), "go together"),
        (dict(ev_correction=False), "keep --ev_correction true"),
        (dict(projection_dim=8), "--projection_dim 0"),
    ],
)
def test_bad_input_is_one_sentence_before_anything_runs(trained, tmp_path, extra, words):
    from bergson_ray.pipelines.approxunrolling import approxunrolling

    root = tmp_path / "src"
    kw = {**COMMON, "checkpoints": [str(trained)], "segments": 2, **extra}
    with pytest.raises(BadInputError, match=words) as err:
        approxunrolling(run_path=str(root), **kw)
    assert "\n" not in str(err.value)
    assert not root.exists()


def test_checkpoints_of_different_architectures_are_refused(trained, tmp_path):
    from helpers import tiny_neox

    from bergson_ray.pipelines.approxunrolling import approxunrolling

    other = tmp_path / "other"
    tiny_neox(hidden=16, vocab=300).save_pretrained(other)
    with pytest.raises(BadInputError, match="different architecture") as err:
        approxunrolling(run_path=str(tmp_path / "src"),
                        **{**COMMON, "checkpoints": [_ckpt(trained, 2), str(other)], "segments": 1})  # fmt: skip
    assert "\n" not in str(err.value) and not (tmp_path / "src").exists()

    empty = tmp_path / "run"
    (empty / "checkpoints" / "step_0.ckpt").mkdir(parents=True)
    with pytest.raises(BadInputError, match="holds no checkpoints after step 0"):
        approxunrolling(run_path=str(tmp_path / "src"), **{**COMMON, "checkpoints": [str(empty)]})


def test_cli_reports_bad_input_in_one_line(trained, tmp_path, capsys):
    import argparse

    from bergson_ray.cli import approxunrolling as cli
    from bergson_ray.cli.main import _guarded

    parser = argparse.ArgumentParser(prog="bergson-ray")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["approxunrolling", str(tmp_path / "src"), "--checkpoints", str(trained),
                              "--dataset", "tiny", "--lr_list", "1e-3,x", "--step_size_list", "2,2"])  # fmt: skip
    assert _guarded(lambda: args.func(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --lr_list expects numbers") and "\n" not in err
