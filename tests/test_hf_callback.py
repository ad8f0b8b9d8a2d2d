"""GradientCollectorCallback: train-time gradient stores equal to the engine's rows.

Every test trains a 2-layer GPT-NeoX (32 wide) on 8 random documents with the HF
``Trainer`` and compares the store with :class:`GradientEngine` rows of the same
documents, parameters and normalizers.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate (pip install accelerate)")

from helpers import assert_same, pad_batch  # noqa: E402

import bergson_ray  # noqa: E402
from bergson_ray.config import GradientConfig  # noqa: E402
from bergson_ray.errors import BadInputError, StoreError  # noqa: E402
from bergson_ray.gradients.engine import GradientEngine  # noqa: E402
from bergson_ray.store.gradient_store import GradientStore  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is fastest, and spares the shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LENGTHS = [5, 9, 7, 12, 6, 8, 10, 4]
P = 8


# --- the recipe (self-contained: Ray Train workers receive these functions by value) ----
def recipe_model(seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, attention_bias=True,
    )
    return GPTNeoXForCausalLM(cfg).float()


def recipe_docs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, 97, (n,), generator=g) for n in LENGTHS]


def recipe_collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right padding with id 0, labels -100 on padding (what a causal-LM collator does)."""
    s = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), s, dtype=torch.long)
    labels = torch.full((len(features), s), -100, dtype=torch.long)
    mask = torch.zeros(len(features), s, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.as_tensor(f["input_ids"])
        labels[i, :n] = ids[i, :n]
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def recipe_train(store, *, batch=4, epochs=1, max_steps=-1, lr=1e-3, accum=1, callbacks=(),
                 out=None, model=None, prepare=True, ddp=False, **cb_kwargs):
    """Train the recipe with the callback; returns ``(callback, trainer)``."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments


    model = recipe_model() if model is None else model
    ds = Dataset.from_dict({"input_ids": [d.tolist() for d in recipe_docs()]})
    args = TrainingArguments(
        output_dir=str(out or Path(store) / "_trainer"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, num_train_epochs=epochs, max_steps=max_steps,
        learning_rate=lr, optim="adamw_torch", report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", seed=0, disable_tqdm=True,
        **({"ddp_backend": "gloo", "ddp_find_unused_parameters": False} if ddp else {}),
    )
    cb = bergson_ray.GradientCollectorCallback(
        store, **{"projection_dim": P, "dtype": "float32", "overwrite": True, **cb_kwargs}
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=recipe_collate,
                      callbacks=[cb, *callbacks])
    if prepare:
        bergson_ray.prepare_for_gradient_collection(trainer)
    trainer.train()
    return cb, trainer


# --- helpers ---------------------------------------------------------------------------
def engine_rows(model, idx, normalizers=None) -> np.ndarray:
    docs = recipe_docs()
    eng = GradientEngine(copy.deepcopy(model), GradientConfig(projection_dim=P),
                         normalizers=normalizers, store_dtype=torch.float32)
    return eng.compute(pad_batch([docs[i] for i in idx])).rows.numpy()


def store_rows(path) -> np.ndarray:
    store = GradientStore.open(path)
    return store.rows(np.arange(store.num_grads)).numpy()


def order_of(path) -> dict[str, list[int]]:
    from datasets import load_from_disk

    return load_from_disk(str(Path(path) / "order.hf"))[:]


class CrashAt:
    """A TrainerCallback that dies at the end of a given global step."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class _Crash(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise RuntimeError("simulated crash")

        return _Crash()


# --- tests -----------------------------------------------------------------------------
def raw_callback(path, **kw):
    """A second collector on the same trainer: rows without optimizer normalization."""
    return bergson_ray.GradientCollectorCallback(
        path, projection_dim=P, dtype="float32", use_optimizer_state=False, overwrite=True, **kw
    )


def test_needs_prepare(tmp_path):
    with pytest.raises(BadInputError, match="prepare_for_gradient_collection"):
        recipe_train(tmp_path / "g", max_steps=1, prepare=False)


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """One optimizer step over 4 documents as 2 accumulated micro-batches of 2, collected
    twice (Adam-normalized under ``adam/``, raw under ``raw/``)."""
    root = tmp_path_factory.mktemp("one_step")
    model = recipe_model()
    before = copy.deepcopy(model)
    seen: list[set] = []  # kwargs reaching the base model (the LM head passes its own on)
    hook = model.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    cb, trainer = recipe_train(root / "adam", batch=2, accum=2, max_steps=1, model=model,
                               track_order=True, callbacks=[raw_callback(root / "raw")])
    hook.remove()
    assert len(seen) == 2 and not any("_idx" in keys for keys in seen), seen
    return root, before, model, cb, trainer


def test_one_step_rows_equal_engine(one_step):
    """Each row is the engine's row for that document at the pre-step parameters; the Adam
    rows are normalized by the optimizer's bias-corrected moments of that very step."""
    root, before, model, cb, trainer = one_step
    order = order_of(root / "adam")
    idx = order["_idx"]
    assert len(idx) == 4 and order["global_step"] == [1] * 4
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    name = "layers.0.attention.query_key_value"
    weight = model.base_model.get_submodule(name).weight
    state, group = opt.state[weight], opt.param_groups[0]
    lr = trainer.args.learning_rate  # step 1's (no warmup); the scheduler moved it since
    v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
    # the optimizer's own step of this very step: lr / (sqrt(v_hat) + eps)
    torch.testing.assert_close(cb.last_normalizers[name].weight_scale(),
                               lr / (v_hat.sqrt() + group["eps"]))
    untouched = np.setdiff1d(np.arange(len(LENGTHS)), idx)
    for sub, normalizers in (("raw", None), ("adam", cb.last_normalizers)):
        rows = store_rows(root / sub / "train" / "epoch_0")
        assert_same(rows[idx], engine_rows(before, idx, normalizers), tol=1e-5)
        assert not rows[untouched].any()


def test_store_is_a_query_store_for_score(one_step, tmp_path):
    """``score --query_path`` accepts the store: same projection settings, same modules."""
    from bergson_ray.config import ScoreRunConfig, as_config
    from bergson_ray.pipelines.score import load_query_matrix

    root, before, *_ = one_step
    store = root / "adam" / "train" / "epoch_0"
    cfg = as_config(ScoreRunConfig, run_path=str(tmp_path / "s"), query_path=str(store),
                    projection_dim=P)
    sizes = GradientEngine(copy.deepcopy(before), GradientConfig(projection_dim=P)).grad_sizes
    assert GradientStore.open(store).grad_sizes == sizes
    query = load_query_matrix(cfg, sizes)
    assert_same(np.asarray(query), store_rows(store), tol=1e-6)
    with pytest.raises(BadInputError, match="other gradient settings"):
        load_query_matrix(as_config(ScoreRunConfig, run_path=str(tmp_path / "t"),
                                    query_path=str(store), projection_dim=P * 2), sizes)


def test_store_config_names_output_dir_for_a_model_built_in_code(one_step):
    """The recipe model was built in code (no path to load it from): each store's
    ``config.yaml`` names the trainer's output_dir (where ``trainer.save_model()`` puts
    it) and this collector's gradient settings, without optimizer state (queries are
    plain gradients)."""
    from bergson_ray.query.store_spec import open_store_spec

    root, _, _, _, trainer = one_step
    for sub in ("adam", "raw"):
        build = open_store_spec(root / sub / "train" / "epoch_0").build
        assert build is not None
        assert build.model.model == str(Path(trainer.args.output_dir).resolve())
        assert build.grad.projection_dim == P and not build.grad.optimizer_state
        assert build.data.dataset == ""


def test_serve_loads_the_recorded_model(tmp_path, tiny_assets):
    """The tiny model loaded from its directory, trained one step with lr = 0 (fixed
    parameters): the store's ``config.yaml`` names that directory, ``serve`` accepts the
    store for text queries (``load_model`` true), and the query side, loading the model
    from the record, makes query rows equal to the store's rows of the same texts."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from bergson_ray.config import ServeConfig, as_config
    from bergson_ray.pipelines.serve import validate
    from bergson_ray.query.query_grads import QueryGradientMaker
    from bergson_ray.query.store_spec import open_store_spec

    model_dir = str(Path(tiny_assets.model_dir).resolve())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = ["Lists are mutable sequences.", "A tuple is an immutable sequence of values.",
             "Dictionaries map keys to values.", "The with statement wraps a block."]
    ds = Dataset.from_dict({"input_ids": [tok(t)["input_ids"] for t in texts]})
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=len(texts), max_steps=1,
        learning_rate=0.0, report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=recipe_collate,
                      processing_class=tok, callbacks=[raw_callback(tmp_path / "g")])
    bergson_ray.prepare_for_gradient_collection(trainer)
    trainer.train()

    store = tmp_path / "g" / "train" / "epoch_0"
    spec = open_store_spec(store)
    assert spec.build is not None and spec.build.model.model == model_dir
    validate(as_config(ServeConfig, store=str(store), load_model=True))  # no "--load_model false"
    maker = QueryGradientMaker(spec)
    assert_same(maker.compute(texts), store_rows(store), tol=1e-5)


def test_shuffled_epochs_in_dataset_order_and_accumulated_sum(tmp_path):
    """lr = 0 keeps the parameters fixed over 2 shuffled epochs: each epoch's store is the
    engine's rows in dataset order, and the accumulated store is twice that (bergson
    2.5.1 assigns instead of adding, and would hold it once)."""
    recipe_train(tmp_path / "g", batch=3, epochs=2, lr=0.0, use_optimizer_state=False,
                 track_order=True, callbacks=[raw_callback(tmp_path / "acc", accumulate_grads=True)])
    ref = engine_rows(recipe_model(), list(range(len(LENGTHS))))
    order = order_of(tmp_path / "g")
    for e in (0, 1):
        assert_same(store_rows(tmp_path / "g" / "train" / f"epoch_{e}"), ref, tol=1e-5)
        visited = [i for i, ep in zip(order["_idx"], order["epoch"]) if ep == e]
        assert sorted(visited) == list(range(len(LENGTHS)))
    assert order["_idx"] != sorted(order["_idx"]), "the sampler did not shuffle"
    assert order["global_step"] == sorted(order["global_step"])
    assert not (tmp_path / "acc" / "train" / "epoch_0").exists()
    assert_same(store_rows(tmp_path / "acc" / "train"), 2 * ref, tol=1e-5)


def test_crash_mid_epoch_leaves_no_complete_store(tmp_path):
    """3 steps per epoch, a crash at step 4 (inside epoch 1): the finished epoch's store is
    complete; the interrupted epoch and the accumulated store exist only as ``.part``,
    which no reader accepts."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        recipe_train(tmp_path / "g", batch=3, epochs=2,
                     callbacks=[raw_callback(tmp_path / "acc", accumulate_grads=True), CrashAt(4)])
    train = tmp_path / "g" / "train"
    assert GradientStore.open(train / "epoch_0").num_items == len(LENGTHS)
    assert not (train / "epoch_1").exists() and (train / "epoch_1.part").is_dir()
    acc = tmp_path / "acc" / "train"
    assert not acc.exists() and (tmp_path / "acc" / "train.part").is_dir()
    for path in (train / "epoch_1", train / "epoch_1.part", acc):
        with pytest.raises(StoreError):
            GradientStore.open(path)
    # a finished store is never replaced silently
    with pytest.raises(BadInputError, match="overwrite=True"):
        recipe_train(tmp_path / "g", batch=3, epochs=1, overwrite=False)


# --- Ray Train: 2 DDP workers (gloo, CPU) = 1 process ----------------------------------
def _two_collectors(store, **kw):
    """Train with two callbacks on one model: normalized rows under ``store/adam``, raw
    rows under ``store/raw`` (both must see every batch's ``_idx``)."""

    raw = bergson_ray.GradientCollectorCallback(
        Path(store) / "raw", projection_dim=P, dtype="float32", use_optimizer_state=False,
        overwrite=True,
    )
    recipe_train(Path(store) / "adam", callbacks=[raw], track_order=True, epochs=1, **kw)


def _ray_train_loop(config: dict) -> None:
    _two_collectors(config["store"], batch=2, out=config["out"], ddp=True)


@pytest.mark.ray
def test_ray_train_two_workers_equal_one_process(tmp_path, ray_session):
    """The same recipe (global batch 4, 2 steps) as 2 Ray Train DDP workers of batch 2 and
    as one process of batch 4: one store in dataset order holding both workers' rows,
    equal to the single process's store."""
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"store": str(tmp_path / "ddp"), "out": str(tmp_path / "ddp_out")},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False,
                                     resources_per_worker={"CPU": 0.5}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=str(tmp_path / "ray_train"), name="hf_callback"),
    )
    trainer.fit()
    _two_collectors(tmp_path / "one", batch=4)

    order = order_of(tmp_path / "ddp" / "adam")
    assert order == order_of(tmp_path / "one" / "adam")
    assert sorted(order["_idx"]) == list(range(len(LENGTHS)))
    raw = store_rows(tmp_path / "ddp" / "raw" / "train" / "epoch_0")
    assert np.abs(raw).sum(axis=1).min() > 0, "a row is missing"
    assert_same(raw, store_rows(tmp_path / "one" / "raw" / "train" / "epoch_0"), tol=1e-5)
    # Adam's first-step moments are the square of the batch gradient; where it nearly
    # cancels (query/key weights at initialization, |g| ~ 1e-8) lr / (sqrt(v) + eps) is
    # large and magnifies the summation-order difference of DDP to ~1e-2 on step 1 rows;
    # from step 2 on the moments average two gradients and rows agree to ~1e-5.
    adam = store_rows(tmp_path / "ddp" / "adam" / "train" / "epoch_0")
    adam_one = store_rows(tmp_path / "one" / "adam" / "train" / "epoch_0")
    step = dict(zip(order["_idx"], order["global_step"]))
    first = [i for i in range(len(LENGTHS)) if step[i] == 1]
    later = [i for i in range(len(LENGTHS)) if step[i] == 2]
    assert_same(adam[first], adam_one[first], tol=2e-2)
    assert_same(adam[later], adam_one[later], tol=1e-4)
