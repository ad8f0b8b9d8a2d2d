"""bergson's model options for build / score / hessian: ``--precision int4|int8``, PEFT
adapters (an adapter directory as ``--model``, ``--peft_init_kwargs``),
``--reshape_to_square``, ``--auto_batch_size`` and ``--apply_batch_size``.

Ground truth for adapter rows: each document alone through the adapter model with
autograd, the gradient of every LoRA weight. The token-budget search is checked against
a simulated out-of-memory threshold.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import assert_same, rows_of

from bergson_ray.config import BatchConfig, BuildConfig, DataConfig, GradientConfig
from bergson_ray.config.coerce import as_config
from bergson_ray.config.commands import HessianRunConfig, ScoreRunConfig
from bergson_ray.config.sections import IndexModelConfig
from bergson_ray.data.batch_size import largest_fitting_budget, probe_batches, search_ceiling
from bergson_ray.errors import BadInputError
from bergson_ray.gradients.losses import per_document_loss
from bergson_ray.runners.gradient_runner import GradientRunner, RunnerSpec

peft = pytest.importorskip("peft")

SPLIT = "train[:6]"
LORA_TARGETS = ("query_key_value", "dense_4h_to_h")


def runner(model: IndexModelConfig, split: str = SPLIT, **batch) -> GradientRunner:
    return GradientRunner(
        RunnerSpec(
            model=model,
            grad=GradientConfig(),
            data=DataConfig(split=split, truncation=True),
            batch=BatchConfig(**{"token_batch_size": 4096, **batch}),
        )
    )


def autograd_rows(model, docs, names: list[str]) -> np.ndarray:
    """Each document alone: the gradient of every module in ``names`` (relative to
    ``model.base_model``), flattened ``[O, I]`` and concatenated in that order."""
    mods = [model.base_model.get_submodule(n) for n in names]
    out = []
    for doc in docs:
        for m in mods:
            m.weight.requires_grad_(True)
            m.weight.grad = None
        ids = torch.as_tensor(doc.input_ids)[None]
        labels = torch.as_tensor(doc.labels)[None]
        per_document_loss(model(ids).logits, labels, reduction="sum").sum().backward()
        out.append(torch.cat([m.weight.grad.reshape(-1) for m in mods]))
        for m in mods:
            m.weight.requires_grad_(False)
    return torch.stack(out).numpy()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_assets):
    """A LoRA adapter on the tiny model, B non-zero (a fresh B is zero, which would make
    every A gradient vanish), saved the way peft saves one."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_assets.model_dir))
    torch.manual_seed(3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=list(LORA_TARGETS)))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("lora") / "adapter"
    model.save_pretrained(path)
    return path, model.eval()


# ---------------------------------------------------------------- --precision int4 / int8
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
@pytest.mark.parametrize("cls", [BuildConfig, ScoreRunConfig, HessianRunConfig])
def test_quantized_precision_is_refused_on_cpu_by_the_config(cls, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a cluster may have GPU workers
    with pytest.raises(BadInputError, match="--precision int8 loads a bitsandbytes-quantized model, which needs a CUDA GPU"):
        as_config(cls, None, run_path=str(tmp_path / "x"), precision="int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_quantized_precision_on_cpu_stops_before_ray(tmp_path, monkeypatch, capsys):
    import bergson_ray.utils.ray_env as ray_env
    from bergson_ray.cli.main import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = []
    monkeypatch.setattr(ray_env, "init_ray", lambda *a, **k: started.append(a))
    run = tmp_path / "q"
    assert main(["build", str(run), "--precision", "int4", "--dataset", "tiny"]) == 2
    assert "--precision int4 loads a bitsandbytes-quantized model" in capsys.readouterr().err
    assert not started and not run.exists() and not Path(f"{run}.part").exists()


def test_quantized_precision_on_a_cluster_is_checked_by_the_worker(tmp_path, monkeypatch):
    """With --address the workers may have GPUs, so the config lets it through; a worker
    that lands on a CPU refuses it with one sentence before loading anything."""
    from bergson_ray.runners.model_loading import load_model

    cfg = as_config(BuildConfig, None, run_path=str(tmp_path / "x"), precision="int4", address="ray://head:10001")
    with pytest.raises(BadInputError, match="runs only on a CUDA GPU, but this worker runs on cpu"):
        load_model(cfg.model, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes needs a CUDA GPU")
def test_int8_store_is_finite_and_close_to_fp32(tmp_path, ray_session, tiny_assets):
    pytest.importorskip("bitsandbytes")
    from bergson_ray.pipelines.build import build

    common = dict(dataset="tiny", split="train[:8]", truncation=True, projection_dim=16, num_workers=1)
    full = rows_of(build(run_path=tmp_path / "fp32", **common))
    quant = rows_of(build(run_path=tmp_path / "int8", precision="int8", **common))
    assert np.isfinite(quant).all()
    cos = (quant * full).sum(1) / (np.linalg.norm(quant, axis=1) * np.linalg.norm(full, axis=1))
    assert cos.min() > 0.8 and cos.mean() > 0.9, cos


# ---------------------------------------------------------------- PEFT adapters
def test_adapter_dir_rows_equal_autograd_of_the_lora_weights(adapter):
    path, model = adapter
    r = runner(IndexModelConfig(model=str(path)))
    names = list(r.engine.grad_sizes)
    # only the adapter is tracked: A and B of every targeted module of every layer
    layers = len(model.base_model.model.gpt_neox.layers)
    want = {
        f"model.gpt_neox.layers.{i}.{kind}.{t}.default"
        for i in range(layers)
        for t in ("lora_A", "lora_B")
        for kind in ("attention.query_key_value", "mlp.dense_4h_to_h")
    }
    assert set(names) == want
    idx = np.arange(6)
    got = r.gradients(idx)["grads"]
    truth = autograd_rows(model, r.tokenize(idx), names)
    assert np.abs(truth).max() > 0
    assert_same(got, truth, tol=1e-5)


def test_fresh_adapter_is_the_same_in_every_worker_and_equals_autograd(tiny_assets):
    from bergson_ray.runners.model_loading import load_model

    cfg = IndexModelConfig(peft_init_kwargs="r=2,target_modules=dense_4h_to_h,init_lora_weights=false")
    a, b = runner(cfg), runner(cfg)  # two workers
    assert all(".lora_" in n for n in a.engine.grad_sizes)
    idx = np.arange(4)
    rows = a.gradients(idx)["grads"]
    assert_same(b.gradients(idx)["grads"], rows, tol=0)
    model, _ = load_model(cfg)
    truth = autograd_rows(model.eval(), a.tokenize(idx), list(a.engine.grad_sizes))
    assert np.abs(truth).max() > 0
    assert_same(rows, truth, tol=1e-5)


def test_adapter_errors_are_one_sentence(adapter, tiny_assets):
    from bergson_ray.runners.model_loading import load_model

    path, _ = adapter
    with pytest.raises(BadInputError, match="already a PEFT adapter"):
        load_model(IndexModelConfig(model=str(path), peft_init_kwargs="r=2"))
    with pytest.raises(BadInputError, match="--peft_init_kwargs"):
        load_model(IndexModelConfig(peft_init_kwargs="r=2,target_modules=no_such_module"))
    with pytest.raises(BadInputError, match="--peft_init_kwargs: expected key=value"):
        IndexModelConfig(peft_init_kwargs="r2")
    with pytest.raises(BadInputError, match="--moe_experts cannot be combined with a PEFT adapter"):
        as_config(BuildConfig, None, run_path="x", peft_init_kwargs="r=2", moe_experts="a.*")


@pytest.mark.ray
def test_build_with_adapter_model_on_ray(adapter, tmp_path, ray_session):
    """``build --model ADAPTER_DIR`` through the pipeline: the driver plans the adapter's
    layout, the workers compute the adapter rows; --reshape_to_square is recorded and,
    as in bergson 2.5.1, changes no row."""
    from bergson_ray.pipelines.build import build

    path, _ = adapter
    out = build(
        run_path=tmp_path / "idx",
        model=str(path),
        dataset="tiny",
        split=SPLIT,
        truncation=True,
        projection_dim=4,
        reshape_to_square=True,
        num_workers=1,
    )
    spec = RunnerSpec(
        model=IndexModelConfig(model=str(path)),
        grad=GradientConfig(projection_dim=4),
        data=DataConfig(split=SPLIT, truncation=True),
        batch=BatchConfig(),
    )
    worker = GradientRunner(spec)
    info = json.loads((out / "info.json").read_text())
    assert list(info["grad_sizes"]) == list(worker.engine.grad_sizes)  # the adapter's modules
    assert_same(rows_of(out), worker.gradients(np.arange(6))["grads"], tol=1e-5)
    proc = yaml.safe_load((out / "processor_config.yaml").read_text())
    assert proc["reshape_to_square"] is True


# ---------------------------------------------------------------- --auto_batch_size
LENGTHS = [300] * 20 + [17] * 50


@pytest.mark.parametrize("threshold", [300, 450, 2000, 5000, 10**6])
def test_search_returns_the_largest_budget_that_fits(threshold):
    probed: list[int] = []

    def fits(n: int) -> bool:  # out of memory above the threshold
        probed.append(n)
        return n <= threshold

    ceiling = search_ceiling(LENGTHS)
    assert ceiling == sum(LENGTHS)
    exact = largest_fitting_budget(LENGTHS, fits, ceiling=ceiling, tolerance=lambda _: 1)
    assert exact == min(threshold, ceiling)
    probed.clear()
    coarse = largest_fitting_budget(LENGTHS, fits, ceiling=ceiling)  # bergson's tolerance
    assert fits(coarse) and min(threshold, ceiling) - max(256, coarse // 16) <= coarse
    assert len(probed) < 20


def test_search_ceiling_and_a_longest_document_that_does_not_fit():
    assert search_ceiling(LENGTHS, window=8) == 8 * 300  # a window packs no more
    assert search_ceiling([17, 3000, 5], window=1) == 3000
    with pytest.raises(BadInputError, match=r"longest document \(300 tokens\) does not fit"):
        largest_fitting_budget(LENGTHS, lambda n: n < 300, ceiling=5000)


def test_probe_batches_are_the_heaviest_batches_of_the_packing():
    from bergson_ray.data.batching import pack_by_token_budget

    lengths = [5, 40, 7, 40, 3, 3, 3, 3, 20]
    batches = probe_batches(lengths, 80, window=None)
    packed = pack_by_token_budget(lengths, 80)
    assert all(b in packed for b in batches)
    padded = max(len(b) * max(lengths[i] for i in b) for b in packed)
    most = max(len(b) for b in packed)
    assert padded in [len(b) * max(lengths[i] for i in b) for b in batches]
    assert most in [len(b) for b in batches]
    # per window: no batch mixes rows of two windows
    assert all(len({i // 4 for i in b}) == 1 for b in probe_batches(lengths, 80, window=4))


def test_auto_batch_size_keeps_the_budget_on_cpu_and_uses_the_search_result(tiny_assets, caplog):
    from bergson_ray.runners.auto_batch import tune_token_batch_size

    plain = runner(IndexModelConfig(), token_batch_size=300)
    auto = runner(IndexModelConfig(), token_batch_size=300, auto_batch_size=True)
    with caplog.at_level(logging.INFO, logger="bergson_ray.runners.auto_batch"):
        assert tune_token_batch_size(auto) == 300
    assert "no out-of-memory signal on cpu, keeping --token_batch_size 300" in caplog.text
    # with a probe (a GPU's, simulated): the largest fitting budget replaces it, rows unchanged
    idx = np.arange(6)
    lengths = [len(d.input_ids) for d in auto.tokenize(idx)]

    def fits(n: int) -> bool:
        return n <= 2 * max(lengths) + 5

    found = tune_token_batch_size(auto, fits=fits)
    assert found == largest_fitting_budget(lengths, fits, ceiling=sum(lengths)) < 300
    assert auto.spec.batch.token_batch_size == found
    assert_same(auto.gradients(idx)["grads"], plain.gradients(idx)["grads"], tol=1e-5)


# ---------------------------------------------------------------- bergson pipeline steps
def test_bergson_build_step_maps_the_options_onto_our_flags():
    from bergson_ray.config.bergson_steps import step_config

    body = {
        "index_cfg": {
            "run_path": "out",
            "model": "tiny",
            "peft_init_kwargs": "r=4,target_modules=query_key_value",
            "reshape_to_square": True,
            "auto_batch_size": True,
            "force_math_sdp": True,
            "data": {"dataset": "tiny"},
        },
        "preprocess_cfg": {"inversion_cfg": {"apply_batch_size": 8}},
    }
    cfg = step_config("build", body, BuildConfig, "step 1 (build)")
    assert cfg.model.peft_init_kwargs == "r=4,target_modules=query_key_value"
    assert cfg.grad.reshape_to_square and cfg.batch.auto_batch_size and cfg.model.force_math_sdp
    assert cfg.preprocess.apply_batch_size == 8
    hess = step_config("hessian", {"index_cfg": {"run_path": "h", "auto_batch_size": True}}, HessianRunConfig, "s")
    assert hess.batch.auto_batch_size
