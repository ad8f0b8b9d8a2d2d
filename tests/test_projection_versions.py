"""Projection-matrix versions: version 2 (bergson >= 2.5, Philox4x32-10) and version 1.

Without bergson: the generator against Random123's known answers, determinism and
device/shape/chunking independence by construction, JL scaling, unbiased inner
products, the identifier scheme (seed suffix, per-head right matrices, global blocks),
and the plumbing into ``processor_config.yaml``, ``config.yaml`` and ``score``.

With bergson's anchor venv (``~/.cache/bergson-anchor/anchor-venv``, skipped with a
reason when absent): our matrices equal bergson 2.5.1's, and our engine's projected rows
equal ``bergson build --projection_dim 16`` on the same tiny model and documents. The
bergson runs are cached under ``~/.cache/bergson-anchor/interop-runs`` (outside the repo).
No Ray anywhere in this file.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import anchor
import numpy as np
import pytest
import torch
import yaml
from anchor import needs_venv
from helpers import pad_batch, random_docs, tiny_neox

from bergson_ray.config import (
    AttentionConfig,
    BatchConfig,
    BuildConfig,
    DataConfig,
    GradientConfig,
    IndexModelConfig,
    ModelConfig,
    PreprocessConfig,
    RunConfig,
    ScoreRunConfig,
)
from bergson_ray.errors import BadInputError
from bergson_ray.gradients import projection as proj
from bergson_ray.gradients.projection import (
    ProjectionCache,
    global_projection_matrix,
    philox4x32_10,
    philox_key,
    projection_identifier,
    projection_matrix,
    random_matrix,
)
from bergson_ray.store.processor import ProcessorConfig

# ------------------------------------------------------------------------------ generator


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123's published known-answer vectors for philox4x32_10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(x) for x in philox4x32_10(counter, key)) == expected


def test_philox_key_is_md5_little_endian_words():
    digest = hashlib.md5(b"layers.0.mlp/left").digest()
    k0, k1 = philox_key("layers.0.mlp/left")
    assert k0 == int.from_bytes(digest[:4], "little") and k1 == int.from_bytes(
        digest[4:8], "little"
    )


def test_rademacher_entries_are_the_counter_bits():
    """Entry (r, c) is bit c % 128 of Philox((c // 128, r, 0, 0)), least significant first."""
    m, n = 3, 300
    A = random_matrix("m/left", m, n, kind="rademacher").numpy()
    key = philox_key("m/left")
    for r, c in [(0, 0), (0, 31), (1, 32), (2, 127), (2, 128), (1, 299)]:
        words = philox4x32_10((c // 128, r, 0, 0), key)
        bit = (int(words[(c % 128) // 32]) >> (c % 32)) & 1
        assert A[r, c] == (1.0 if bit else -1.0)


def test_normal_entries_are_box_muller_of_the_counter_words():
    key = philox_key("m/right")
    A = random_matrix("m/right", 2, 9, kind="normal").numpy()
    for r, c in [(0, 0), (0, 1), (1, 2), (1, 3), (0, 8)]:
        words = [int(w) for w in philox4x32_10((c // 4, r, 0, 0), key)]
        a, b = words[0:2] if (c >> 1) & 1 == 0 else words[2:4]
        u1 = float((np.float32(a) + np.float32(0.5)) * np.float32(2.0**-32))
        theta = float(np.float32(2 * math.pi) * (np.float32(b) * np.float32(2.0**-32)))
        rho = math.sqrt(-2.0 * math.log(u1))
        want = rho * (math.sin(theta) if c & 1 else math.cos(theta))
        assert A[r, c] == np.float32(want)


# ------------------------------------------------------------------ version 2 properties


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_v2_is_deterministic_and_shape_independent(kind):
    a = projection_matrix("x/left", 16, 1000, kind=kind)
    assert torch.equal(a, projection_matrix("x/left", 16, 1000, kind=kind))
    # a pure function of (identifier, row, column): a prefix is the smaller matrix
    big = random_matrix("x/left", 20, 1300, kind=kind)
    torch.testing.assert_close(
        random_matrix("x/left", 7, 301, kind=kind), big[:7, :301], rtol=0, atol=0
    )
    assert not torch.equal(a, projection_matrix("x/right", 16, 1000, kind=kind))
    seeded = projection_identifier("x", "left", 3)
    assert seeded == "x/left/seed3"
    assert not torch.equal(a, projection_matrix(seeded, 16, 1000, kind=kind))


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_v2_does_not_depend_on_how_generation_is_split(kind, monkeypatch):
    """Chunking is ours to choose (as threads/devices would be): the values never move."""
    whole = random_matrix("y/right", 33, 777, kind=kind)
    monkeypatch.setattr(proj, "_CHUNK", 512)
    torch.testing.assert_close(random_matrix("y/right", 33, 777, kind=kind), whole, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_v2_is_device_independent(kind):
    """Generated on the CPU from integer arithmetic and only then moved, so every device
    gets the same numbers; checked against CUDA when there is one."""
    cpu = projection_matrix("z/left", 8, 513, kind=kind)
    devices = ["cuda"] if torch.cuda.is_available() else []
    for dev in devices:
        on_dev = projection_matrix("z/left", 8, 513, kind=kind, device=dev)
        torch.testing.assert_close(on_dev.cpu(), cpu, rtol=0, atol=0)
    # narrower dtypes are the fp32 matrix rounded (±1 exactly)
    bf16 = random_matrix("z/left", 8, 513, kind=kind, dtype=torch.bfloat16)
    assert torch.equal(bf16, random_matrix("z/left", 8, 513, kind=kind).to(torch.bfloat16))


def test_v2_scaling():
    m, n = 16, 4096
    jl = projection_matrix("s/left", m, n)
    assert torch.all(jl.abs() == 1 / math.sqrt(m))
    assert 0.4 < float((jl > 0).float().mean()) < 0.6
    rn = projection_matrix("s/left", m, n, scale="row_norm")
    torch.testing.assert_close(rn.norm(dim=1), torch.ones(m))
    normal = random_matrix("s/right", 64, 50_000, kind="normal").double()
    assert abs(float(normal.mean())) < 0.003 and abs(float(normal.var()) - 1) < 0.003
    # standard normal tails, not just the right variance
    assert abs(float((normal.abs() > 1.96).double().mean()) - 0.05) < 0.002
    jl_n = projection_matrix("s/right", m, n, kind="normal").double()
    assert abs(float(jl_n.var()) * m - 1) < 0.05


@pytest.mark.parametrize("kind", ["rademacher", "normal"])
def test_v2_inner_products_unbiased(kind):
    """E[<L G1 Rᵀ, L G2 Rᵀ>] = <G1, G2> over independent matrices (identifiers)."""
    g = torch.Generator().manual_seed(0)
    o, i, p = 12, 10, 4
    G1 = torch.randn(o, i, generator=g)
    G2 = G1 + 0.5 * torch.randn(o, i, generator=g)
    truth = float((G1 * G2).sum())
    draws = []
    for k in range(3000):
        L = projection_matrix(f"d{k}/left", p, o, kind=kind, version=2)
        R = projection_matrix(f"d{k}/right", p, i, kind=kind, version=2)
        draws.append(float(((L @ G1 @ R.T) * (L @ G2 @ R.T)).sum()))
    draws = torch.tensor(draws)
    sem = float(draws.std() / math.sqrt(len(draws)))
    assert abs(float(draws.mean()) - truth) < 4 * sem + 1e-3 * abs(truth)
    assert float(draws.std()) > 0


def test_global_matrix_is_made_of_named_blocks(monkeypatch):
    monkeypatch.setattr(proj, "GLOBAL_BLOCK_NUMEL", 4 * 128)  # 128 columns per block at p=4
    full = global_projection_matrix("g/single", 4, 300, scale="row_norm")
    blocks = [random_matrix(f"g/single/{s}", 4, min(300, s + 128) - s) for s in (0, 128, 256)]
    raw = torch.cat(blocks, dim=1)
    torch.testing.assert_close(full, raw / raw.norm(dim=1, keepdim=True), rtol=0, atol=0)
    assert torch.equal(
        global_projection_matrix("g/single", 4, 300, version=1),
        projection_matrix("g/single", 4, 300, version=1),
    )


# ------------------------------------------------------------------------------ version 1


def test_version_1_is_kept():
    """Version 1 = bergson-spec §3.3: md5 seed -> PCG64 bytes, bits MSB first."""
    m, n = 5, 37
    seed = int.from_bytes(hashlib.md5(b"v/left").digest(), "big") % (2**63 - 1)
    raw = np.random.Generator(np.random.PCG64(seed)).bytes(math.ceil(m * n / 8))
    bits = np.unpackbits(np.frombuffer(raw, np.uint8))[: m * n].reshape(m, n)
    want = torch.from_numpy(bits.astype(np.float32) * 2 - 1) / math.sqrt(m)
    assert torch.equal(projection_matrix("v/left", m, n, version=1), want)
    assert not torch.equal(projection_matrix("v/left", m, n, version=2), want)
    with pytest.raises(ValueError, match="projection_version"):
        projection_matrix("v/left", m, n, version=3)


def test_cache_applies_seed_and_version():
    c = ProjectionCache("rademacher", "jl", version=2, seed=5)
    got = c.get("mod", "left", 4, 9, torch.float32, "cpu")
    assert torch.equal(got, projection_matrix("mod/left/seed5", 4, 9))
    assert c.get("mod", "left", 4, 9, torch.float32, "cpu") is got
    v1 = ProjectionCache("rademacher", "jl", version=1).get(
        "mod", "left", 4, 9, torch.float32, "cpu"
    )
    assert torch.equal(v1, projection_matrix("mod/left", 4, 9, version=1))


# ------------------------------------------------------------------------- engine plumbing


def _batch(lengths=(9, 5)):
    return pad_batch(random_docs(lengths))


def _full_rows(model, cfg: GradientConfig):
    from dataclasses import replace

    from bergson_ray.gradients.engine import GradientEngine

    eng = GradientEngine(model, replace(cfg, projection_dim=0))
    rows = eng.compute(_batch()).rows
    out, col = {}, 0
    for name, size in eng.grad_sizes.items():
        out[name] = rows[:, col : col + size]
        col += size
    return out, eng.collector.blocks


@pytest.mark.parametrize("version, seed", [(2, None), (2, 11), (1, None)])
def test_engine_uses_the_configured_version_and_seed(version, seed):
    from bergson_ray.gradients.engine import GradientEngine

    model, p = tiny_neox(layers=1), 4
    cfg = GradientConfig(projection_dim=p, projection_version=version, projection_seed=seed)
    rows = GradientEngine(model, cfg).compute(_batch()).rows
    full, blocks = _full_rows(model, cfg)
    col = 0
    for name, G in full.items():
        blk = next(b for bs in blocks.values() for b in bs if b.name == name)
        L = projection_matrix(
            projection_identifier(name, "left", seed), p, blk.out_features, version=version
        )
        R = projection_matrix(
            projection_identifier(name, "right", seed), p, blk.in_features, version=version
        )
        want = torch.einsum(
            "po,noi,qi->npq", L, G.reshape(-1, blk.out_features, blk.in_features), R
        )
        got = rows[:, col : col + p * p]
        col += p * p
        assert float((got - want.reshape(len(got), -1)).norm() / want.norm()) < 1e-5, name


@pytest.mark.parametrize("version", [2, 1])
def test_split_heads_with_bias_use_per_head_right_matrices_in_version_2(version):
    """bergson 2.5 projects a split head's ``[G_h | b_h]`` with the head's own right matrix
    (``<module>.head_<h>/right``); version 1 keeps the module's."""
    from bergson_ray.gradients.engine import GradientEngine

    model, p = tiny_neox(layers=1), 4
    qkv = "layers.0.attention.query_key_value"
    cfg = GradientConfig(
        projection_dim=p, include_bias=True, projection_version=version,
        split_attention_modules=[qkv], attention=AttentionConfig(num_heads=4, head_size=24),
    )  # fmt: skip
    eng = GradientEngine(model, cfg)
    rows = eng.compute(_batch()).rows
    full, _ = _full_rows(model, cfg)
    col = 0
    blocks = {b.name: b for bs in eng.collector.blocks.values() for b in bs}
    for name, size in eng.grad_sizes.items():
        blk = blocks[name]
        G = full[name].reshape(len(rows), blk.out_features, blk.in_features + 1)  # [G_h | b_h]
        right_owner = name if (version == 2 or ".head_" not in name) else qkv
        L = projection_matrix(f"{name}/left", p, blk.out_features, version=version)
        R = projection_matrix(f"{right_owner}/right", p, blk.in_features + 1, version=version)
        want = (L @ G @ R.T).reshape(len(rows), -1)
        got = rows[:, col : col + size]
        col += size
        assert float((got - want).norm() / want.norm()) < 1e-5, name


def test_processor_config_records_version_and_seed(tmp_path):
    cfg = ProcessorConfig.from_gradient_config(GradientConfig(projection_dim=16, projection_seed=4))
    assert (cfg.projection_version, cfg.projection_seed) == (2, 4)
    assert (
        ProcessorConfig.from_gradient_config(
            GradientConfig(projection_version=1)
        ).projection_version
        == 1
    )
    assert ProcessorConfig().projection_version == 2
    cfg.save(tmp_path)
    text = yaml.safe_load((tmp_path / "processor_config.yaml").read_text())
    assert text["projection_version"] == 2 and text["projection_seed"] == 4
    (tmp_path / "processor_config.yaml").write_text("projection_dim: 16\n")  # pre-version file
    assert ProcessorConfig.load(tmp_path).projection_version == 1


def _query_store(path: Path, grad: GradientConfig) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    ProcessorConfig.from_gradient_config(grad).save(path)
    return path


def test_score_refuses_query_stores_of_another_version_or_seed(tmp_path):
    from bergson_ray.pipelines.score import check_query_compatible

    run = ScoreRunConfig(grad=GradientConfig(projection_dim=16))
    check_query_compatible(_query_store(tmp_path / "same", run.grad), run)
    old = _query_store(tmp_path / "v1", GradientConfig(projection_dim=16, projection_version=1))
    with pytest.raises(BadInputError, match="projection_version.*--projection_version 1"):
        check_query_compatible(old, run)
    seeded = _query_store(tmp_path / "seed", GradientConfig(projection_dim=16, projection_seed=2))
    with pytest.raises(BadInputError, match="projection_seed"):
        check_query_compatible(seeded, run)
    # without a projection the matrices do not exist, so neither setting matters
    unprojected = ScoreRunConfig(grad=GradientConfig(projection_version=1, projection_seed=9))
    check_query_compatible(_query_store(tmp_path / "p0", GradientConfig()), unprojected)


# ------------------------------------------------------------------------------ config.yaml


def _build_cfg(run_path: Path) -> BuildConfig:
    return BuildConfig(
        run=RunConfig(run_path=str(run_path)),
        model=IndexModelConfig(model="/models/m", precision="fp32"),  # build's model section
        data=DataConfig(dataset="/data/d", split="train[:8]", truncation=True),
        grad=GradientConfig(projection_dim=16, projection_seed=3, include_bias=True),
        batch=BatchConfig(token_batch_size=512),
        preprocess=PreprocessConfig(
            unit_normalize=True, inversion="pseudoinverse", damping_factor=0.25, aggregation="mean"
        ),
    )


def test_config_yaml_has_bergson_sections_and_still_reads_back(tmp_path):
    from bergson_ray.store.config_yaml import build_step_body, load_step_config
    from bergson_ray.store.run_dir import RunDir

    cfg = _build_cfg(tmp_path / "run")
    rd = RunDir(cfg.run.run_path)
    rd.write_config(build_step_body(cfg), command="build")  # what build/reduce write
    rd.commit()
    doc = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    body = doc["steps"][0]["build"]
    assert body["preprocess_cfg"] == {
        "unit_normalize": True, "hessian_path": None, "ev_correction": False,
        "inversion_cfg": {"inversion": "pseudoinverse", "damping_factor": 0.25,
                          "apply_batch_size": 2},  # bergson's InversionConfig fields
        "aggregation": "mean", "normalize_aggregated_grad": False,
    }  # fmt: skip
    idx = body["index_cfg"]
    assert idx["projection_dim"] == 16 and idx["projection_seed"] == 3 and idx["include_bias"]
    assert idx["model"] == "/models/m" and idx["data"]["split"] == "train[:8]"
    assert idx["token_batch_size"] == 512
    assert load_step_config(tmp_path / "run", BuildConfig) == cfg
    assert load_step_config(tmp_path / "run", BuildConfig, "build").grad.projection_version == 2


def test_config_yaml_without_version_is_version_1(tmp_path):
    """Stores we wrote before recording the version were all built with version 1."""
    from dataclasses import asdict

    from bergson_ray.store.config_yaml import load_step_config

    body = asdict(_build_cfg(tmp_path))
    del body["grad"]["projection_version"], body["grad"]["projection_seed"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"steps": [{"build": body}]}))
    assert load_step_config(tmp_path, BuildConfig).grad.projection_version == 1


def test_tiny_resolves_to_paths_bergson_can_load(tiny_assets, tmp_path):
    from bergson_ray.store.config_yaml import bergson_index_cfg

    idx = bergson_index_cfg(BuildConfig(run=RunConfig(run_path=str(tmp_path))))
    assert idx["model"] == str(tiny_assets.model_dir)
    assert idx["data"]["dataset"] == str(tiny_assets.corpus_dir)


# ============================================================== against bergson 2.5.1

_BERGSON_MATRICES = """
import json, sys
import numpy as np, torch
import bergson.collector.collector as col
cases, out = json.loads(sys.argv[1]), sys.argv[2]
col.CHUNKED_PROJECTION_INSTANTIATION_NUMEL = int(sys.argv[3])  # small blocks for the global case
res = {}
for i, (name, role, seed, m, n, kind, scale, dtype) in enumerate(cases):
    dt = getattr(torch, dtype)
    if role == "single":  # global: P @ R.T with P = I gives R.T, block by block
        ident = col.HookCollectorBase.projection_identifier(name, role, seed)
        A = col.project_global(ident, torch.eye(n, dtype=dt), m, kind, scale).T
    else:
        A = col.create_module_projection_matrix(name, role, m, n, dt, torch.device("cpu"), kind, scale, seed)
    res[f"c{i}"] = A.float().numpy()
np.savez(out, **res)
print("{}")
"""

MATRIX_CASES = [
    # (name, role, seed, m, n, kind, scale, dtype)
    ("layers.0.attention.query_key_value", "left", None, 16, 384, "rademacher", "jl", "float32"),
    ("layers.0.mlp.dense_4h_to_h", "right", None, 16, 513, "rademacher", "jl", "float32"),
    ("layers.3.mlp.dense_h_to_4h", "right", 7, 64, 50_000, "rademacher", "jl", "float32"),
    ("m.head_2", "left", 0, 5, 257, "rademacher", "row_norm", "float32"),
    ("m", "right", None, 16, 300, "rademacher", "jl", "bfloat16"),
    ("layers.1.attention.dense", "left", None, 16, 128, "normal", "jl", "float32"),
    ("layers.1.attention.dense", "right", 3, 64, 50_000, "normal", "jl", "float32"),
    ("n", "right", None, 7, 131, "normal", "row_norm", "float32"),
    ("g", "single", None, 4, 1000, "rademacher", "jl", "float32"),
    ("g", "single", 2, 4, 1000, "normal", "row_norm", "float32"),
]
GLOBAL_BLOCK = 4 * 300  # 300-column blocks at p = 4: the global cases span 4 blocks


@needs_venv
def test_matrices_equal_bergson(tmp_path, monkeypatch):
    out = tmp_path / "bergson_matrices.npz"
    proc = anchor.run(
        ["python", "-c", _BERGSON_MATRICES, json.dumps(MATRIX_CASES), str(out), str(GLOBAL_BLOCK)],
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = np.load(out)
    monkeypatch.setattr(proj, "GLOBAL_BLOCK_NUMEL", GLOBAL_BLOCK)
    for i, (name, role, seed, m, n, kind, scale, dtype) in enumerate(MATRIX_CASES):
        cache = ProjectionCache(kind, scale, version=2, seed=seed)
        ours = cache.get(name, role, m, n, getattr(torch, dtype), "cpu").float().numpy()
        ref = theirs[f"c{i}"]
        assert ours.shape == ref.shape
        if kind == "rademacher":  # bits: identical (global blocks included)
            np.testing.assert_array_equal(ours, ref, err_msg=str(MATRIX_CASES[i]))
        else:
            # Box-Muller: bergson rounds log/sqrt/cos/sin to float32 at every step, we
            # round once from float64; ~40% of entries end up 1-4 ulp apart (measured max
            # 6e-8 absolute after JL scaling, 2.2e-7 of the max with row_norm).
            np.testing.assert_allclose(
                ours, ref, rtol=1e-6, atol=1e-7, err_msg=str(MATRIX_CASES[i])
            )


# ------------------------------------------------------------- rows vs bergson build

QKV = "layers.0.attention.query_key_value"
_COMMON = [
    "--split",
    "train[:8]",
    "--truncation",
    "--token_batch_size",
    "512",
    "--projection_dim",
    "16",
]
ROW_RUNS: dict[str, tuple[list[str], dict]] = {
    # name: (extra bergson CLI args, our GradientConfig overrides)
    "p16": ([], {}),
    "p16_normal_bias_seed": (
        ["--projection_type", "normal", "--include_bias", "true", "--projection_seed", "7"],
        {"projection_type": "normal", "include_bias": True, "projection_seed": 7},
    ),
    "p16_global": (["--projection_target", "global"], {"projection_target": "global"}),
    "p16_heads_bias": (
        ["--include_bias", "true", "--split_attention_modules", QKV,
         "--num_heads", "4", "--head_size", "96", "--head_dim", "2"],
        {"include_bias": True, "split_attention_modules": [QKV],
         "attention": AttentionConfig(num_heads=4, head_size=96, head_dim=2)},
    ),
    "p16_tokens": (["--attribute_tokens", "true"], {"attribute_tokens": True}),
}  # fmt: skip


@pytest.fixture(scope="module")
def bergson_tiny_runs(tiny_assets) -> Path:
    """``bergson build`` on OUR tiny model and corpus, cached per tiny build."""
    tag = hashlib.md5((tiny_assets.root / "manifest.json").read_bytes()).hexdigest()[:10]
    runs = anchor.RUNS / f"bergson_ray-tiny-{tag}"
    runs.mkdir(parents=True, exist_ok=True)
    for name, (extra, _) in ROW_RUNS.items():
        out = runs / name
        if (out / "info.json").exists():
            continue
        cmd = ["bergson", "build", str(out), "--model", str(tiny_assets.model_dir),
               "--dataset", str(tiny_assets.corpus_dir), *_COMMON, *extra, "--overwrite", "true"]  # fmt: skip
        log = runs / f"{name}.log"
        rc = anchor.run(cmd, cwd=runs, log=log).returncode
        if rc != 0:
            pytest.fail(f"bergson build {name} failed (rc={rc}):\n{log.read_text()[-3000:]}")
    return runs


@needs_venv
@pytest.mark.parametrize("name", list(ROW_RUNS))
def test_projected_rows_equal_bergson_build(bergson_tiny_runs, tiny_assets, name):
    import datasets

    from bergson_ray.runners.gradient_runner import GradientRunner, RunnerSpec
    from bergson_ray.store.gradient_store import GradientStore

    theirs = GradientStore.open(bergson_tiny_runs / name)
    assert theirs.processor.projection_version == 2
    spec = RunnerSpec(
        model=ModelConfig(model=str(tiny_assets.model_dir)),
        grad=GradientConfig(projection_dim=16, **ROW_RUNS[name][1]),
        data=DataConfig(dataset=str(tiny_assets.corpus_dir), split="train[:8]", truncation=True),
        batch=BatchConfig(token_batch_size=512),
    )
    runner = GradientRunner(spec)
    assert list(runner.engine.grad_sizes) == list(theirs.grad_sizes)
    assert ProcessorConfig.from_gradient_config(spec.grad) == theirs.processor
    out = runner.gradients(np.arange(theirs.num_items))
    ours = np.concatenate(list(out["grads"])) if spec.grad.attribute_tokens else out["grads"]
    ref = theirs.rows(slice(None)).numpy()
    assert ours.shape == ref.shape
    # measured: bit-identical except the normal-projection run (3.7e-7 of the max)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    data = datasets.load_from_disk(str(bergson_tiny_runs / name / "data.hf"))
    np.testing.assert_array_equal(out["length"], data["length"])
    np.testing.assert_allclose(out["loss"], data["loss"], rtol=1e-6)
