"""Interop with the real bergson (the "anchor" venv from shared/tools/anchor).

Two directions:

* stores written by bergson's CLI open in our readers with the same numbers that
  bergson's own loaders return;
* stores written by our writers open in bergson's loaders (``load_gradients``,
  ``TokenGradients``, ``load_scores``, ``load_scores_loss_signed``,
  ``GradientProcessor.load``), and bergson's ``score`` command accepts a query index we
  wrote, giving the same scores as on its own index.

bergson runs in its own venv (``~/.cache/bergson-anchor/anchor-venv``), driven through
subprocesses; its CLI outputs are cached under ``~/.cache/bergson-anchor/interop-runs``
(outside the repo) so only the first run pays for them (about two minutes on 2 cores).
Skipped when the anchor venv or its tiny assets are absent: create them with
``bash scripts/bergson_anchor.sh``.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import anchor
import numpy as np
import pytest
import torch
from anchor import DATA, MODEL, RUNS, needs_anchor

from bergson_ray.config import (
    BatchConfig,
    BuildConfig,
    DataConfig,
    GradientConfig,
    ModelConfig,
    PreprocessConfig,
    RunConfig,
    ScoreRunConfig,
)
from bergson_ray.store.config_yaml import build_step_body, load_step_config
from bergson_ray.store.files import offsets_from_counts
from bergson_ray.store.gradient_store import GradientStore
from bergson_ray.store.gradient_writer import GradientStoreWriter
from bergson_ray.store.processor import (
    NormalizerState,
    ProcessorConfig,
    load_processor,
    read_total_processed,
    save_processor,
    write_total_processed,
)
from bergson_ray.store.run_dir import RunDir
from bergson_ray.store.score_store import ScoreStore
from bergson_ray.store.score_writer import ScoreWriter

pytestmark = needs_anchor

@pytest.fixture(scope="session")
def bergson_runs() -> dict[str, Path]:
    """bergson's CLI outputs (``anchor.CLI_RUNS``), produced once and cached."""
    return anchor.cli_runs()


def in_bergson(script: str, *args: str) -> dict:
    """Run ``script`` in bergson's venv; it prints one JSON object as its last line."""
    proc = anchor.run(["python", "-c", textwrap.dedent(script), *args], timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"anchor script failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


_DUMP_REFERENCE = """
import json, sys
import numpy as np
from pathlib import Path
from bergson.data import load_gradients, load_module_gradients, load_scores, load_scores_loss_signed
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {}
for name in sys.argv[3].split(","):
    mm = load_gradients(runs / name)
    np.save(out / f"{name}.npy", np.asarray(mm).astype(np.float32))
    res[name] = {"dtype": str(mm.dtype), "shape": list(mm.shape),
                 "modules": list(load_module_gradients(runs / name).keys())}
for name in sys.argv[4].split(","):
    s = load_scores(runs / name)
    signed, _ = load_scores_loss_signed(str(runs / name))
    written = np.stack([np.asarray(s.mmap[f"written_{i}"]) for i in range(s.num_scores)], 1)
    np.savez(out / f"{name}.npz", scores=np.asarray(s[:]).astype(np.float32), written=written,
             signed=signed.float().numpy() if s.offsets is None else np.zeros(0))
    res[name] = {"dtype": str(s.mmap.dtype["score_0"]), "len": len(s),
                 "is_written": bool(s.is_written()), "num_scores": s.num_scores,
                 "offsets": None if s.offsets is None else s.offsets.tolist()}
print(json.dumps(res))
"""

GRADIENT_RUNS = ["build_p16", "build_tokens", "build_bf16", "query_p16", "reduce_mean"]
SCORE_RUNS = ["score_p16", "score_bf16", "score_tokens"]


@pytest.fixture(scope="session")
def reference(bergson_runs, tmp_path_factory) -> tuple[dict, Path]:
    """What bergson's own loaders return for its runs (one subprocess for all)."""
    out = tmp_path_factory.mktemp("bergson_reference")
    meta = in_bergson(
        _DUMP_REFERENCE, str(RUNS), str(out), ",".join(GRADIENT_RUNS), ",".join(SCORE_RUNS)
    )
    return meta, out


# ------------------------------------------------------------- bergson's stores, our reader


@pytest.mark.parametrize("name", GRADIENT_RUNS)
def test_we_read_bergson_gradient_stores(bergson_runs, reference, name):
    path = bergson_runs[name]
    ref = reference[0][name]
    expected = np.load(reference[1] / f"{name}.npy")

    store = GradientStore.open(path)
    assert [store.num_grads, store.total_dim] == ref["shape"]
    assert list(store.grad_sizes) == ref["modules"]
    np.testing.assert_array_equal(store.rows(slice(None)).numpy(), expected)
    assert store.info.base_dtype == ref["dtype"]
    # chunked streaming sees the same rows
    np.testing.assert_array_equal(
        torch.cat([c.rows for c in store.iter_chunks(7)]).numpy(), expected
    )
    # module views match the flat layout
    first = next(iter(store.grad_sizes))
    np.testing.assert_array_equal(
        store.modules([first]).numpy(), expected[:, : store.grad_sizes[first]]
    )
    assert store.processor is not None and store.processor.projection_dim == 16
    if name == "build_bf16":
        assert store.dtype == torch.bfloat16
    if name == "reduce_mean":
        assert store.num_grads == 1
    if name == "build_tokens":
        assert store.attribute_tokens
        lengths = np.asarray(store.data["length"])
        np.testing.assert_array_equal(np.diff(store.offsets), np.maximum(lengths - 1, 0))
        i = int(np.argmax(np.diff(store.offsets)))
        np.testing.assert_array_equal(
            store.item_rows(i).numpy(), expected[store.offsets[i] : store.offsets[i + 1]]
        )
    if name == "build_p16":
        assert len(store.data) == store.num_items
        assert read_total_processed(path) == int(
            torch.load(path / "total_processed.pt", weights_only=True)
        )
        state = load_processor(path)
        assert state.config.projection_version == 2  # bergson 2.5's Philox matrices
        assert state.normalizers == {} and state.hessians == {}


@pytest.mark.parametrize("name", SCORE_RUNS)
def test_we_read_bergson_score_stores(bergson_runs, reference, name):
    path = bergson_runs[name]
    ref = reference[0][name]
    expected = np.load(reference[1] / f"{name}.npz")
    store = ScoreStore.open(path)
    assert store.num_scores == ref["num_scores"] == 3
    assert store.num_items == ref["len"]
    np.testing.assert_array_equal(store.scores, expected["scores"])
    np.testing.assert_array_equal(store.written, expected["written"])
    assert store.is_complete() is ref["is_written"] is True
    assert store.higher_is_better is True
    if ref["offsets"] is None:
        np.testing.assert_array_equal(store.loss_signed(), expected["signed"])
    else:
        np.testing.assert_array_equal(store.offsets, ref["offsets"])
    if name == "score_bf16":
        assert ref["dtype"] == "bfloat16" and store.dtype == torch.bfloat16
    if name == "score_p16":
        # read through our three readers, bergson's runs agree: an "individual" score is
        # the inner product of a training row (build_p16 holds the same docs) and a query row
        train = GradientStore.open(bergson_runs["build_p16"]).rows(slice(0, store.num_rows))
        query = GradientStore.open(bergson_runs["query_p16"]).rows(slice(None))
        predicted = (train.double() @ query.double().T).numpy()
        np.testing.assert_allclose(store.scores, predicted, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------- our stores, bergson's reader

_LOAD_OURS = """
import json, sys
import numpy as np, torch
from pathlib import Path
from bergson.data import load_gradients, load_module_gradients, TokenGradients, load_scores, load_scores_loss_signed
from bergson.gradients import GradientProcessor
root = Path(sys.argv[1])
res = {}
for name in ("g_float32", "g_float16", "g_bfloat16"):
    mm = load_gradients(root / name)
    np.save(root / f"{name}.out.npy", np.asarray(mm).astype(np.float32))
    res[name] = {"dtype": str(mm.dtype), "modules": list(load_module_gradients(root / name).keys())}
tg = TokenGradients(root / "g_tokens")
np.save(root / "g_tokens.out.npy", np.concatenate([tg[i].astype(np.float32) for i in range(len(tg))]))
res["g_tokens"] = {"counts": tg.num_token_grads.tolist()}
for name in ("s_float32", "s_float16", "s_bfloat16", "s_tokens"):
    s = load_scores(root / name)
    signed, _ = load_scores_loss_signed(str(root / name))
    np.savez(root / f"{name}.out.npz", scores=np.asarray(s[:]).astype(np.float32),
             signed=signed.float().numpy())
    res[name] = {"is_written": bool(s.is_written()), "len": len(s), "dtype": str(s.mmap.dtype["score_0"])}
p = GradientProcessor.load(root / "proc")
res["proc"] = {
    "projection_dim": p.projection_dim, "projection_version": p.projection_version,
    "include_bias": p.include_bias, "normalizers": {k: type(v).__name__ for k, v in p.normalizers.items()},
    "row": p.normalizers["m.ada"].row.tolist(), "hess": p.hessians["m.adam"].tolist(),
    "eigvals": p.hessians_eigen["m.adam"][0].tolist(),
    "total_processed": int(torch.load(root / "proc" / "total_processed.pt", weights_only=True)),
}
print(json.dumps(res))
"""


def test_bergson_reads_our_stores(tmp_path):
    sizes = {"layers.0.attention.dense": 6, "layers.0.mlp.dense_4h_to_h": 10}
    rows = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    for dtype in ("float32", "float16", "bfloat16"):
        with GradientStoreWriter(
            tmp_path / f"g_{dtype}", num_items=5, grad_sizes=sizes, dtype=dtype
        ) as w:
            w.write_rows(np.arange(5)[::-1], rows.flip(0))
    counts = [2, 0, 3]
    tok_rows = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with GradientStoreWriter(
        tmp_path / "g_tokens", num_items=3, grad_sizes=sizes,
        attribute_tokens=True, offsets=offsets_from_counts(counts),
    ) as w:  # fmt: skip
        w.write_items([2, 0, 1], torch.cat([tok_rows[2:], tok_rows[:2]]), [3, 2, 0])

    scores = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    for dtype in ("float32", "float16", "bfloat16"):
        rd = RunDir(tmp_path / f"s_{dtype}")
        with ScoreWriter(rd.path, 4, 2, dtype) as w:
            w.write([0, 1, 2, 3], scores)
        rd.write_config({"score_cfg": {"higher_is_better": True, "top_k": 3}}, command="score")
        rd.commit()
    with ScoreWriter(
        tmp_path / "s_tokens", 5, 2, attribute_tokens=True, offsets=offsets_from_counts(counts)
    ) as w:
        w.write_items([2], scores[:1].repeat(3, 1))  # item 0's two rows stay unwritten

    adam = torch.rand(4, 4) + 0.1
    hess = torch.eye(4) * 3
    save_processor(
        tmp_path / "proc",
        ProcessorConfig(projection_dim=4, include_bias=True, projection_version=2),
        normalizers={
            "m.adam": NormalizerState("AdamNormalizer", {"weight_avg_sq": adam}),
            "m.ada": NormalizerState(
                "AdafactorNormalizer", {"row": torch.arange(1.0, 5.0), "col": torch.ones(4)}
            ),
        },
        hessians={"m.adam": hess},
        hessians_eigen={"m.adam": torch.linalg.eigh(hess)},
    )
    write_total_processed(tmp_path / "proc", 777)

    res = in_bergson(_LOAD_OURS, str(tmp_path))

    for dtype in ("float32", "float16", "bfloat16"):
        got = np.load(tmp_path / f"g_{dtype}.out.npy")
        expected = GradientStore.open(tmp_path / f"g_{dtype}").rows(slice(None)).numpy()
        np.testing.assert_array_equal(got, expected)
        assert res[f"g_{dtype}"]["dtype"] == dtype
        assert res[f"g_{dtype}"]["modules"] == list(sizes)
    np.testing.assert_array_equal(np.load(tmp_path / "g_float32.out.npy"), rows.numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "g_tokens.out.npy"), tok_rows.numpy())
    assert res["g_tokens"]["counts"] == counts

    for dtype in ("float32", "float16", "bfloat16"):
        out = np.load(tmp_path / f"s_{dtype}.out.npz")
        ours = ScoreStore.open(tmp_path / f"s_{dtype}")
        np.testing.assert_array_equal(out["scores"], ours.scores)
        np.testing.assert_array_equal(out["signed"], ours.loss_signed())
        np.testing.assert_array_equal(out["signed"], -ours.scores)  # higher_is_better honoured
        assert res[f"s_{dtype}"] == {"is_written": True, "len": 4, "dtype": dtype}
    assert res["s_tokens"]["is_written"] is False and res["s_tokens"]["len"] == 3
    token_scores = np.load(tmp_path / "s_tokens.out.npz")["scores"]
    np.testing.assert_array_equal(token_scores[2:], scores[:1].repeat(3, 1).numpy())
    np.testing.assert_array_equal(token_scores[:2], 0)

    p = res["proc"]
    assert p["projection_dim"] == 4 and p["projection_version"] == 2 and p["include_bias"] is True
    assert p["normalizers"] == {"m.adam": "AdamNormalizer", "m.ada": "AdafactorNormalizer"}
    assert p["row"] == [1.0, 2.0, 3.0, 4.0]
    np.testing.assert_array_equal(np.array(p["hess"]), hess.numpy())
    np.testing.assert_allclose(p["eigvals"], [3.0] * 4)
    assert p["total_processed"] == 777


_BERGSON_PROCESSOR = """
import sys, torch
from pathlib import Path
from bergson.gradients import GradientProcessor, AdamNormalizer, AdafactorNormalizer
h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
GradientProcessor(
    normalizers={"a": AdamNormalizer(torch.full((2, 3), 0.5), torch.ones(2)),
                 "b": AdafactorNormalizer(torch.ones(2), torch.arange(3.0))},
    hessians={"a": h}, hessians_eigen={"a": tuple(torch.linalg.eigh(h))}, projection_dim=8,
).save(Path(sys.argv[1]))
print("{}")
"""


def test_we_read_bergson_processor_files(tmp_path):
    """Normalizers/Hessians written by bergson's own GradientProcessor.save."""
    in_bergson(_BERGSON_PROCESSOR, str(tmp_path))
    state = load_processor(tmp_path)
    assert state.config.projection_dim == 8 and state.config.projection_version == 2
    assert state.normalizers["a"].kind == "AdamNormalizer"
    assert set(state.normalizers["a"].tensors) == {"weight_avg_sq", "bias_avg_sq"}
    assert state.normalizers["b"].kind == "AdafactorNormalizer"
    torch.testing.assert_close(state.normalizers["b"].tensors["col"], torch.arange(3.0))
    torch.testing.assert_close(state.hessians["a"], torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    values, vectors = state.hessians_eigen["a"]
    torch.testing.assert_close(values, torch.tensor([1.0, 3.0]))
    assert vectors.shape == (2, 2)


def test_bergson_scores_against_our_copy_of_its_query_index(bergson_runs, tmp_path):
    """End to end: rewrite bergson's query index with OUR writer and processor files,
    point ``bergson score`` at it, and get bergson's scores on its own index."""
    src = GradientStore.open(bergson_runs["query_p16"])
    ours = tmp_path / "query_ours"
    rd = RunDir(ours)
    with GradientStoreWriter(
        rd.path, num_items=src.num_items, grad_sizes=src.grad_sizes, dtype=src.info.base_dtype
    ) as w:
        w.write_rows(np.arange(src.num_items), src.rows(slice(None)))
    state = load_processor(src.path)
    save_processor(rd.path, state.config, normalizers=state.normalizers)
    write_total_processed(rd.path, read_total_processed(src.path))
    shutil.copytree(src.path / "data.hf", rd.path / "data.hf")
    rd.commit()

    args = list(anchor.CLI_RUNS["score_p16"])
    args[args.index("{RUNS}/query_p16")] = str(ours)
    anchor.bergson_cli("score_on_ours", args, tmp_path / "score_on_ours")
    theirs = ScoreStore.open(bergson_runs["score_p16"])
    again = ScoreStore.open(tmp_path / "score_on_ours")
    assert again.is_complete()
    np.testing.assert_allclose(again.scores, theirs.scores, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- our config.yaml, bergson's reader

_BERGSON_READS_OUR_CONFIG = """
import json, sys
from dataclasses import asdict
from bergson.config import IndexConfig, PreprocessConfig
from bergson.config.config_io import load_subconfig
pre = load_subconfig(sys.argv[1], "preprocess_cfg", PreprocessConfig)
idx = load_subconfig(sys.argv[1], "index_cfg", IndexConfig)
print(json.dumps({"pre": asdict(pre), "idx": asdict(idx)}, default=str))
"""


def _write_build_config(run: RunDir, cfg) -> None:
    """Exactly what ``build``/``reduce`` write: our fields + bergson's sections."""
    run.write_config(build_step_body(cfg), command="build")


def test_bergson_reads_our_config_yaml(tmp_path):
    cfg = BuildConfig(
        run=RunConfig(run_path=str(tmp_path / "run")),
        model=ModelConfig(model=str(MODEL)),
        data=DataConfig(dataset=str(DATA / "pydoc"), split="train[:8]", truncation=True),
        grad=GradientConfig(projection_dim=16, projection_seed=5, include_bias=True),
        batch=BatchConfig(token_batch_size=1024, max_batch_size=4),
        preprocess=PreprocessConfig(
            unit_normalize=True, hessian_path="/runs/hess", inversion="pseudoinverse",
            damping_factor=0.3, aggregation="mean", normalize_aggregated_grad=True,
        ),
    )  # fmt: skip
    rd = RunDir(cfg.run.run_path)
    _write_build_config(rd, cfg)
    rd.commit()

    res = in_bergson(_BERGSON_READS_OUR_CONFIG, str(tmp_path / "run"))
    pre = res["pre"]
    assert pre["unit_normalize"] is True and pre["hessian_path"] == "/runs/hess"
    assert pre["inversion_cfg"]["inversion"] == "pseudoinverse"
    assert pre["inversion_cfg"]["damping_factor"] == 0.3
    assert pre["aggregation"] == "mean" and pre["normalize_aggregated_grad"] is True
    assert pre["ev_correction"] is False
    idx = res["idx"]
    assert idx["model"] == str(MODEL) and idx["precision"] == "fp32"
    assert idx["data"]["dataset"] == str(DATA / "pydoc") and idx["data"]["split"] == "train[:8]"
    assert idx["data"]["truncation"] is True
    assert (idx["projection_dim"], idx["projection_seed"], idx["include_bias"]) == (16, 5, True)
    assert (idx["projection_type"], idx["projection_scale"]) == ("rademacher", "jl")
    assert (idx["token_batch_size"], idx["max_batch_size"]) == (1024, 4)
    # and our own reader still rebuilds the exact BuildConfig
    assert load_step_config(tmp_path / "run", BuildConfig) == cfg


def test_bergson_scores_against_a_query_store_we_built(bergson_runs, tmp_path):
    """End to end: our engine computes the query rows (projection version 2), our writers
    store them with the files ``build`` writes, and ``bergson score`` accepts the store
    and reproduces the scores it gets with its own query index."""
    import datasets

    from bergson_ray.pipelines.score import check_query_compatible
    from bergson_ray.runners.gradient_runner import GradientRunner, RunnerSpec

    cfg = BuildConfig(
        run=RunConfig(run_path=str(tmp_path / "query_ours")),
        model=ModelConfig(model=str(MODEL)),
        data=DataConfig(dataset=str(DATA / "pydoc_query"), split="train[:3]", truncation=True),
        grad=GradientConfig(projection_dim=16),
    )
    runner = GradientRunner(
        RunnerSpec(model=cfg.model, grad=cfg.grad, data=cfg.data, batch=cfg.batch)
    )
    out = runner.gradients(np.arange(3))
    theirs = GradientStore.open(bergson_runs["query_p16"])
    assert list(runner.engine.grad_sizes) == list(theirs.grad_sizes)
    ref = theirs.rows(slice(None)).numpy()
    np.testing.assert_allclose(out["grads"], ref, rtol=0, atol=1e-5 * np.abs(ref).max())

    rd = RunDir(cfg.run.run_path)
    with GradientStoreWriter(
        rd.path, num_items=3, grad_sizes=runner.engine.grad_sizes, dtype="float32"
    ) as w:
        w.write_rows(np.arange(3), out["grads"])
    save_processor(rd.path, ProcessorConfig.from_gradient_config(cfg.grad))
    write_total_processed(rd.path, int(np.maximum(out["length"] - 1, 0).sum()))
    ds = datasets.load_from_disk(str(DATA / "pydoc_query")).select(range(3))
    ds = ds.add_column("length", out["length"].tolist()).add_column("loss", out["loss"].tolist())
    ds.save_to_disk(str(rd.path / "data.hf"))
    _write_build_config(rd, cfg)
    rd.commit()
    # both directions agree the projections match: our score accepts bergson's store too
    check_query_compatible(bergson_runs["query_p16"], ScoreRunConfig(grad=cfg.grad))

    args = list(anchor.CLI_RUNS["score_p16"])
    args[args.index("{RUNS}/query_p16")] = str(tmp_path / "query_ours")
    anchor.bergson_cli("score_on_our_build", args, tmp_path / "score_on_our_build")
    again = ScoreStore.open(tmp_path / "score_on_our_build")
    assert again.is_complete()
    np.testing.assert_allclose(
        again.scores, ScoreStore.open(bergson_runs["score_p16"]).scores, rtol=1e-5, atol=1e-4
    )


def test_we_read_bergson_config_yaml(bergson_runs):
    """bergson's build steps hold only ``index_cfg``/``preprocess_cfg``: we rebuild our
    BuildConfig from them, taking the projection version from processor_config.yaml."""
    cfg = load_step_config(bergson_runs["build_p16"], BuildConfig)
    assert cfg.model.model == str(MODEL) and cfg.data.dataset == str(DATA / "pydoc")
    assert (cfg.data.split, cfg.data.truncation) == ("train[:40]", True)
    assert (cfg.grad.projection_dim, cfg.grad.projection_version) == (16, 2)
    assert cfg.grad.projection_seed is None and cfg.drop_columns is True
    reduced = load_step_config(bergson_runs["reduce_mean"], BuildConfig)
    assert reduced.preprocess.aggregation == "mean"
    assert (reduced.preprocess.inversion, reduced.preprocess.damping_factor) == (
        "damped_inverse",
        0.1,
    )
