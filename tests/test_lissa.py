"""``lissa``: the series against the dense damped inverse, the Gauss-Newton product against
autograd, the scale check, and the Ray pipeline (CLI end to end, 1 vs 2 workers, resume,
bad input); one interop check against bergson's own ``lissa`` when its venv is present."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anchor
import numpy as np
import pytest
import torch

from bergson_ray.config.coerce import as_config
from bergson_ray.config.lissa import LissaRunConfig
from bergson_ray.errors import BadInputError, RunExistsError
from bergson_ray.hessians.lissa import (
    LissaSettings,
    check_scale,
    combine_repeats,
    lissa,
    lissa_repeat,
    query_generator,
    repeat_generator,
)

# --------------------------------------------------------------------- a tiny dense problem


def _problem(n_docs: int = 6, dims=(3, 4), seed: int = 0, spread: float = 1.0):
    """Per-document vectors x_i in two blocks; G_B = mean_{i in B} x_i x_i^T."""
    g = torch.Generator().manual_seed(seed)
    d = sum(dims)
    x = torch.randn(n_docs, d, generator=g, dtype=torch.float64) * spread
    names = [f"m{k}" for k in range(len(dims))]
    cuts = np.cumsum([0, *dims])

    def split(flat):
        return {n: flat[cuts[k] : cuts[k + 1]].clone() for k, n in enumerate(names)}

    def product(v, indices):
        flat = torch.cat([v[n] for n in names])
        xb = x[indices]
        return split(xb.T @ (xb @ flat) / len(indices))

    q = torch.randn(d, generator=g, dtype=torch.float64)
    return x, split, product, q, names


def _flat(blocks, names):
    return torch.cat([blocks[n] for n in names])


def test_lissa_converges_to_the_damped_inverse_hessian_vector_product():
    x, split, product, q, names = _problem()
    n, damping = len(x), 0.5
    exact = torch.linalg.solve(x.T @ x / n + damping * torch.eye(x.shape[1], dtype=x.dtype), q)
    scale = float(torch.linalg.eigvalsh(x.T @ x / n).max()) + 1.0  # < lambda_max(A) < 2 scale
    errors = []
    for depth in (4, 16, 64, 256):
        est = lissa(product, split(q), n, LissaSettings(damping, scale, depth, n), 1,
                    query_generator(0, 0))
        errors.append(float((_flat(est, names) - exact).norm() / exact.norm()))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6, errors
    # stochastic batches (2 of 6 documents per step): unbiased, so repeats average the noise
    est = lissa(product, split(q), n, LissaSettings(damping, scale, 100, 2), 16,
                query_generator(3, 1))
    assert float((_flat(est, names) - exact).norm() / exact.norm()) < 0.1


def test_each_repeat_alone_replays_the_sequential_draws():
    """A repeat run as its own job (another worker, a resumed run) sees the batches it
    would see in bergson's sequential loop, so the combined estimate is identical."""
    _, split, product, q, _ = _problem(n_docs=9)
    s = LissaSettings(0.05, 20.0, 7, 3)
    whole = lissa(product, split(q), 9, s, 3, query_generator(5, 2))
    parts = [lissa_repeat(product, split(q), 9, s, repeat_generator(5, 2, r, 9, s.depth))
             for r in range(3)]
    apart = combine_repeats(parts, s.scale)
    for name in whole:
        torch.testing.assert_close(apart[name], whole[name], rtol=0, atol=0)


def test_a_too_small_scale_is_one_sentence():
    x, split, product, q, _ = _problem(spread=5.0)
    top = float(torch.linalg.eigvalsh(x.T @ x / len(x)).max())
    small = LissaSettings(0.01, top / 4, 200, len(x))
    with pytest.raises(BadInputError, match="raise --scale") as err:  # before the series
        check_scale(product, split(q), len(x), small)
    assert "\n" not in str(err.value) and f"--scale {small.scale:g}" in str(err.value)
    with pytest.raises(BadInputError, match="growing instead of settling.*raise --scale"):
        lissa_repeat(product, split(q), len(x), small, query_generator(0, 0))
    fine = LissaSettings(0.01, top, 200, len(x))
    assert check_scale(product, split(q), len(x), fine) == pytest.approx(top, rel=0.05)
    lissa_repeat(product, split(q), len(x), fine, query_generator(0, 0))  # no error


# ------------------------------------------------------- the Gauss-Newton product vs autograd

VOCAB = 17  # few logits: the dense Jacobian stays small


@pytest.mark.parametrize(("arch", "module", "reduction"), [
    ("neox", "layers.0.attention.dense", "sum"),  # nn.Linear
    ("gpt2", "h.0.attn.c_proj", "mean"),  # HF Conv1D: weight stored [I, O]
])
def test_gauss_newton_product_equals_the_dense_matrix(arch, module, reduction):
    from helpers import pad_batch, random_docs, tiny_gpt2, tiny_neox

    from bergson_ray.config import GradientConfig
    from bergson_ray.gradients.modules import find_target_modules, weight_as_out_in
    from bergson_ray.hessians.gauss_newton import GaussNewtonProduct

    model = (tiny_neox if arch == "neox" else tiny_gpt2)(vocab=VOCAB)
    model.config._attn_implementation = "eager"
    model.eval().requires_grad_(False)
    mods = find_target_modules(model, GradientConfig(modules=[module], include_bias=True))
    gn = GaussNewtonProduct(model, mods, include_bias=True, loss_reduction=reduction)
    (name, mod), = mods.items()
    o, i = gn.shapes[name]
    batch = pad_batch(random_docs([5, 3, 4], vocab=VOCAB), prompt_lens=[1, 0, 2])
    v = torch.randn(o * i, generator=torch.Generator().manual_seed(1))
    got = gn.product({name: v}, batch.input_ids, batch.labels, 3)[name]

    def logits(flat):  # the module's [O, I+1] block (bias last) -> logits
        block = flat.reshape(o, i)
        w = block[:, :-1] if isinstance(mod, torch.nn.Linear) else block[:, :-1].T
        params = {gn.weight_param[name]: w, gn.bias_param[name]: block[:, -1]}
        return torch.func.functional_call(model, params, (batch.input_ids,)).logits[:, :-1]

    w0 = torch.cat([weight_as_out_in(mod), mod.bias[:, None]], 1).reshape(-1)
    jac = torch.autograd.functional.jacobian(logits, w0, vectorize=True)  # [N, S, V, D]
    p = torch.softmax(logits(w0), -1)
    mask = (batch.labels[:, 1:] != -100).double()
    weight = mask / 3
    if reduction == "mean":
        weight = weight / mask.sum(1, keepdim=True)
    hess = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    dense = torch.einsum("nsvd,ns,nsvu,nsue->de", jac, weight.float(), hess, jac)
    torch.testing.assert_close(got, dense @ v, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------- config, bad input


def test_bad_options_are_one_sentence(tmp_path):
    from bergson_ray.pipelines.lissa import lissa as run_lissa

    cases = [
        ({"projection_dim": 16}, "--projection_dim 0"),
        ({"scale": 0.0}, "--scale must be > 0"),
        ({"depth": 0}, "--depth must be >= 1"),
        ({"fsdp": True}, "drop --fsdp"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BadInputError, match=message):
            as_config(LissaRunConfig, run_path="x", **kwargs)
    root = tmp_path / "empty"
    with pytest.raises(BadInputError) as err:  # an empty query set, before any step
        run_lissa(run_path=str(root), dataset="tiny", split="train[:4]",
                  **{"query.split": "train[2:2]"})
    assert "\n" not in str(err.value) and "train[2:2]" in str(err.value)
    assert not root.exists()


# ------------------------------------------------------------------------- the Ray pipeline

SERIES = dict(depth=3, repeats=2, batch_size=2, micro_batch_size=2, scale=500.0)
CLI = ["--model", "tiny", "--dataset", "tiny", "--split", "train[:6]", "--truncation",
       "--query.split", "train[:2]", "--query.truncation", "--torch_threads", "1",
       *[a for k, v in SERIES.items() for a in (f"--{k}", str(v))]]
KW = dict(dataset="tiny", split="train[:6]", truncation=True, torch_threads=1, **SERIES)


def _rows(path: Path) -> np.ndarray:
    from bergson_ray.store.gradient_store import GradientStore

    return GradientStore.open(path).rows(slice(None)).numpy()


def _scores(path: Path) -> np.ndarray:
    from bergson_ray.store.score_store import ScoreStore

    store = ScoreStore.open(path)
    assert store.is_complete()
    return np.asarray(store.scores, np.float32)


@pytest.fixture(scope="module")
def one_worker(ray_session, tmp_path_factory) -> Path:
    """``bergson-ray lissa`` end to end on the tiny defaults, one worker in this process
    (the two-worker Ray pool below must give the same solutions)."""
    from bergson_ray.cli.main import main

    root = tmp_path_factory.mktemp("lissa") / "one"
    assert main(["lissa", str(root), "--executor", "process", *CLI]) == 0
    return root


@pytest.mark.ray
def test_cli_end_to_end_writes_a_score_store_validate_reads(one_worker):
    from bergson_ray.validation.scores import load_loss_signed

    record = json.loads((one_worker / "lissa.json").read_text())
    assert record["ran"] == ["query", "lissa_query", "scores"]
    solve = record["lissa"]
    assert (solve["queries"], solve["repeats_computed"], solve["repeats_reused"]) == (2, 4, 0)
    assert 0 < solve["top_eigenvalue_estimate"] < 2 * SERIES["scale"]
    assert not (one_worker / "lissa_query" / "repeats").exists()  # combined, then removed
    q, x = _rows(one_worker / "query"), _rows(one_worker / "lissa_query")
    assert q.shape == x.shape and np.isfinite(x).all() and np.abs(x).max() > 0
    scores = load_loss_signed(one_worker / "scores")  # what `validate --scores` reads
    assert scores.matrix.shape == (6, 2) and scores.negated  # higher_is_better: true
    np.testing.assert_allclose(_scores(one_worker / "scores"), -scores.matrix)


@pytest.mark.ray
def test_resume_on_two_workers_computes_only_missing_repeats(one_worker, tmp_path):
    """One of four repeats is already in the unfinished step (written by a worker's job run
    in this process); --resume on two workers computes only the other three, and the store
    and the scores equal the one-worker run's bit for bit (one run checks both: a repeat's
    result does not depend on where, or in which run, it was computed)."""
    from bergson_ray.actors.lissa_runner import LissaRunner, LissaSpec
    from bergson_ray.config import BatchConfig, DataConfig, GradientConfig, ModelConfig
    from bergson_ray.pipelines.lissa import lissa as run_lissa

    root = tmp_path / "run"
    shutil.copytree(one_worker / "query", root / "query")
    spec = LissaSpec(
        model=ModelConfig(), grad=GradientConfig(), batch=BatchConfig(),
        data=DataConfig(dataset="tiny", split="train[:6]", truncation=True),
        query_path=str(root / "query"), repeats_dir=str(root / "lissa_query.part" / "repeats"),
        settings=LissaSettings(0.01, SERIES["scale"], SERIES["depth"], SERIES["batch_size"]),
        micro_batch_size=SERIES["micro_batch_size"], torch_threads=1,
    )
    threads = torch.get_num_threads()
    try:
        LissaRunner(spec).run((1, 0))
    finally:
        torch.set_num_threads(threads)
    out = run_lissa(run_path=str(root), num_workers=2, resume=True, **KW)
    record = json.loads((root / "lissa.json").read_text())
    assert record["reused"] == ["query"] and record["ran"] == ["lissa_query", "scores"]
    solve = record["lissa"]
    assert (solve["repeats_computed"], solve["repeats_reused"], solve["workers"]) == (3, 1, 2)
    assert not (root / "lissa_query" / "repeats").exists()
    np.testing.assert_array_equal(_rows(root / "lissa_query"), _rows(one_worker / "lissa_query"))
    np.testing.assert_array_equal(_scores(out), _scores(one_worker / "scores"))
    with pytest.raises(RunExistsError, match="--resume"):  # a finished run is not redone
        run_lissa(run_path=str(root), num_workers=1, **KW)
    with pytest.raises(BadInputError, match="full gradients of this model's modules"):
        run_lissa(run_path=str(tmp_path / "bad"), query_path=str(root / "query"),
                  filter_modules="*mlp*", **KW)  # another layout: refused before any step
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------- bergson's own lissa

@pytest.mark.ray
@anchor.needs_anchor
def test_bergson_lissa_gives_the_same_solutions(ray_session, tmp_path):
    """Same query store, same batches, same Gauss-Newton products: bergson's
    ``lissa_query`` and ours agree to float rounding (bergson run cached across sessions)."""
    from bergson_ray.config import RunConfig
    from bergson_ray.pipelines.lissa import solve_queries

    data = anchor.DATA
    ref = anchor.RUNS / "lissa_tiny"
    args = ["--depth", "3", "--repeats", "2", "--lissa_cfg.batch_size", "2",
            "--micro_batch_size", "2", "--scale", "1000"]
    if not (ref / "lissa_query" / "info.json").exists():
        ref.parent.mkdir(parents=True, exist_ok=True)
        proc = anchor.run(
            ["bergson", "lissa", ref, "--model", anchor.MODEL, "--overwrite", "true",
             "--data.dataset", data / "pydoc", "--data.split", "train[:6]",
             "--data.truncation", "true", "--query.dataset", data / "pydoc_query",
             "--query.split", "train[:2]", "--query.truncation", "true", *args],
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = as_config(
        LissaRunConfig, run_path=str(tmp_path), model=str(anchor.MODEL),
        dataset=str(data / "pydoc"), split="train[:6]", truncation=True, num_workers=1, depth=3,
        repeats=2, batch_size=2, micro_batch_size=2, scale=1000.0,
    )
    ours, _ = solve_queries(cfg, ref / "query", RunConfig(run_path=str(tmp_path / "lq")))
    theirs = _rows(ref / "lissa_query")
    np.testing.assert_allclose(_rows(ours), theirs, rtol=0, atol=1e-6 * np.abs(theirs).max())
