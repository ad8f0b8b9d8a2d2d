"""MAGIC's math without Ray: metagradients against finite differences, and the
identities between schedules, micro-batching, aggregations and per-token scores."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import random_docs, tiny_neox

from bergson_ray.config.training import LRScheduleConfig, TrainingConfig
from bergson_ray.magic import Recipe, StateStore, metagradient, query_gradient
from bergson_ray.magic.replay import forward, initial_weights, reverse
from bergson_ray.training import doc_losses, train
from bergson_ray.training.data import TokenizedData
from bergson_ray.training.losses import token_losses


def _cfg(**kw) -> TrainingConfig:
    base = dict(
        lr_schedule=LRScheduleConfig(lr=3e-2, lr_scheduler_type="constant"),
        batch_size=4, num_epochs=1, seed=3, eps_root=1e-8, weight_decay=0.01,
        save_mode="all", save_optimizer_state="none", torch_threads=1,
    )
    return TrainingConfig(**{**base, **kw})


def _setup(n_docs=10, dtype=torch.float64, query_lengths=(7, 7, 7), **cfg):
    model = tiny_neox(hidden=16, layers=1, intermediate=24, seed=0).to(dtype)
    data = TokenizedData.from_ids(random_docs([5 + (i % 4) for i in range(n_docs)], seed=1))
    query = TokenizedData.from_ids(random_docs(list(query_lengths), seed=7))
    return Recipe(model, data, _cfg(**cfg)), query


def _pooled_query_loss(recipe: Recipe, params, query: TokenizedData) -> float:
    from torch.func import functional_call

    from bergson_ray.training.data import collate

    ids, labels = collate(query, tuple(range(len(query))))
    with torch.no_grad():
        logits = functional_call(recipe.model, params, (ids,), {"use_cache": False}).logits
        tok, valid = token_losses(logits, labels)
    return float(tok.sum() / valid.sum())


def test_matches_central_finite_differences():
    recipe, query = _setup(max_grad_norm=1.0)
    scores = metagradient(recipe, query, "mean")
    h = 1e-4
    for i in (0, 3, 7):
        vals = []
        for sign in (1, -1):
            w = torch.ones(len(recipe.data), dtype=torch.float64)
            w[i] += sign * h
            params = train(recipe.model, recipe.data, recipe.cfg, w).params
            vals.append(_pooled_query_loss(recipe, params, query))
        fd = (vals[0] - vals[1]) / (2 * h)
        assert scores[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-9), (i, fd)


def test_per_query_columns_average_to_mean_mode_with_equal_token_counts():
    # every query document has 6 loss tokens, so the pooled token mean is the mean of
    # the per-document token means, and the metagradient is linear in the cotangent
    recipe, query = _setup(query_lengths=(7, 7, 7))
    cols = metagradient(recipe, query, "none")
    pooled = metagradient(recipe, query, "mean")
    assert cols.shape == (len(recipe.data), 3)
    torch.testing.assert_close(cols.mean(dim=1), pooled, rtol=1e-9, atol=1e-12)
    summed = metagradient(recipe, query, "sum")
    torch.testing.assert_close(summed, pooled * 18, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["sqrt", "log"])
def test_save_modes_give_identical_scores(mode):
    recipe, query = _setup(n_docs=22, batch_size=2)  # 11 steps
    ref = metagradient(recipe, query, "mean")
    other = metagradient(dataclasses.replace(recipe, cfg=_cfg(batch_size=2, save_mode=mode)), query)
    torch.testing.assert_close(other, ref, rtol=0, atol=0)


def test_micro_batches_and_double_backward_split_agree():
    recipe, query = _setup(n_docs=12, max_grad_norm=0.5)
    ref = metagradient(recipe, query, "mean")
    accum = dataclasses.replace(recipe, cfg=_cfg(grad_accum_steps=2, max_grad_norm=0.5))
    torch.testing.assert_close(metagradient(accum, query), ref, rtol=1e-8, atol=1e-12)
    split = dataclasses.replace(recipe, double_backward_batch_size=1)
    torch.testing.assert_close(metagradient(split, query), ref, rtol=1e-8, atol=1e-12)
    both = dataclasses.replace(accum, double_backward_batch_size=1)
    torch.testing.assert_close(metagradient(both, query), ref, rtol=1e-8, atol=1e-12)


def test_sum_of_means_sgd_and_muon_match_finite_differences():
    for opt in ("sgd", "muon"):
        recipe, query = _setup(n_docs=8, optimizer=opt, loss_reduction="sum_of_means",
                               weight_decay=0.0)
        scores = metagradient(recipe, query, "mean")
        h, i = 1e-4, 2
        vals = []
        for sign in (1, -1):
            w = torch.ones(len(recipe.data), dtype=torch.float64)
            w[i] += sign * h
            vals.append(_pooled_query_loss(recipe, train(recipe.model, recipe.data, recipe.cfg, w).params, query))
        assert scores[i].item() == pytest.approx((vals[0] - vals[1]) / (2 * h), rel=1e-4, abs=1e-9)


def test_per_token_scores_sum_to_document_scores():
    recipe, query = _setup(n_docs=8)
    per_doc = metagradient(recipe, query, "mean")
    per_tok = metagradient(recipe, query, "mean", per_token=True)
    assert per_tok.shape == (8, recipe.data.max_length)
    torch.testing.assert_close(per_tok.sum(dim=1), per_doc, rtol=1e-9, atol=1e-12)
    # a position that predicts nothing (the last token, padding) gets no score
    for d in range(8):
        n = int(recipe.data.input_ids[d].numel())
        assert torch.all(per_tok[d, n - 1 :] == 0)


def test_directory_store_and_backward_resume(tmp_path):
    recipe, query = _setup(n_docs=12, save_mode="sqrt")
    weights = initial_weights(recipe, False)
    store = StateStore(tmp_path / "ckpt")
    final = forward(recipe, weights, store)
    assert store.steps() == [0, 1, 2]  # T=3: isqrt(3)=1 -> every step
    cot, _ = query_gradient(recipe.model, final.params, query, "mean")
    ref = reverse(recipe, store, cot, weights)
    # a reverse pass that stops after one step resumes from its saved state
    path = tmp_path / "backward.safetensors"
    calls = []

    def stop_after_one(done, total):
        calls.append(done)
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reverse(recipe, store, cot, weights, backward_path=path, save_every=1, progress=stop_after_one)
    assert path.is_file()
    resumed = reverse(recipe, store, cot, weights, backward_path=path, save_every=1)
    torch.testing.assert_close(resumed, ref, rtol=0, atol=0)
    assert not path.exists()


def test_query_losses_match_doc_losses():
    recipe, query = _setup()
    params = {k: v.detach() for k, v in recipe.model.named_parameters()}
    _, loss = query_gradient(recipe.model, params, query, "none", 1)
    assert loss == pytest.approx(float(doc_losses(recipe.model, params, query)[1]))


def test_dropout_in_train_mode_replays_the_same_masks():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=97, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=24, max_position_embeddings=64, hidden_dropout=0.2,
        attention_dropout=0.2,
    )).double().eval()  # train_mode switches dropout on for training only
    data = TokenizedData.from_ids(random_docs([6, 7, 5, 8, 6, 7], seed=1))
    query = TokenizedData.from_ids(random_docs([7, 7], seed=7))
    recipe = Recipe(model, data, _cfg(train_mode=True, grad_accum_steps=2, batch_size=3,
                                      save_mode="sqrt"))
    scores = metagradient(recipe, query, "mean")
    h, i = 1e-5, 4  # Adam's first steps are strongly curved: small h
    vals = []
    for sign in (1, -1):
        w = torch.ones(len(data), dtype=torch.float64)
        w[i] += sign * h
        vals.append(_pooled_query_loss(recipe, train(model, data, recipe.cfg, w).params, query))
    assert scores[i].item() == pytest.approx((vals[0] - vals[1]) / (2 * h), rel=1e-5, abs=1e-9)
