"""The functional trainer (``bergson_ray.training``): each test checks one property.

Tiny randomly initialised GPT-NeoX models and a handful of random documents keep every
test to a few seconds; the reference loops use ``torch.optim`` and the model's own HF
loss, so they share nothing with the trainer but the batch order.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import random_docs, tiny_neox

from bergson_ray.config.training import LRScheduleConfig, TrainingConfig
from bergson_ray.errors import BadInputError
from bergson_ray.training import (
    TokenizedData,
    batch_order,
    checkpoint_steps,
    doc_losses,
    initial_params,
    lr_schedule,
    train,
)
from bergson_ray.training.data import collate

torch.set_num_threads(1)


def _data(n: int = 8, seed: int = 1) -> TokenizedData:
    lengths = [3 + (5 * i) % 7 for i in range(n)]
    return TokenizedData.from_ids(random_docs(lengths, seed=seed))


def _cfg(**kw) -> TrainingConfig:
    sched = kw.pop("lr_schedule", LRScheduleConfig(lr=3e-3))
    return TrainingConfig(batch_size=4, save_mode="final", lr_schedule=sched, **kw)


def _hf_loss(model, data, rows) -> torch.Tensor:
    """The model's own mean token loss over ``rows`` (HF's causal-LM loss)."""
    ids, labels = collate(data, rows)
    return model(input_ids=ids, labels=labels).loss


def _reference(model, data, cfg, opt, loss_fn=None) -> dict[str, torch.Tensor]:
    """Train ``model`` in place with a ``torch.optim`` optimizer over bergson's batches."""
    batches = batch_order(len(data), cfg.batch_size, cfg.num_epochs, cfg.seed)
    sched = lr_schedule(cfg.lr_schedule, len(batches))
    for i, b in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = sched(i)
        opt.zero_grad()
        (loss_fn or _hf_loss)(model, data, b.rows).backward()
        opt.step()
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def _assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def test_adamw_equals_torch_adamw():
    """eps_root=0: our AdamW (linear decay, 2 epochs) == torch.optim.AdamW to 1e-6.

    adam_eps=1e-6 because the attention key bias has a gradient of pure rounding noise
    (softmax ignores it), which Adam with eps=1e-8 would blow up to full-size steps."""
    data, model = _data(8), tiny_neox()
    cfg = _cfg(eps_root=0.0, num_epochs=2, adam_eps=1e-6)
    ours = train(model, data, cfg).params
    ref_opt = torch.optim.AdamW(
        model.parameters(), lr=1.0, betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
    )  # fmt: skip
    _assert_close(ours, _reference(model, data, cfg, ref_opt))


def test_sgd_equals_torch_sgd():
    """SGD with momentum adam_beta1 and coupled weight decay == torch.optim.SGD."""
    data, model = _data(8), tiny_neox()
    cfg = _cfg(optimizer="sgd", lr_schedule=LRScheduleConfig(lr=0.1, warmup_steps=1))
    ours = train(model, data, cfg).params
    ref_opt = torch.optim.SGD(
        model.parameters(), lr=1.0, momentum=cfg.adam_beta1, weight_decay=cfg.weight_decay
    )
    _assert_close(ours, _reference(model, data, cfg, ref_opt))


def test_model_is_not_mutated_and_none_equals_ones():
    """Training leaves the module alone; weights=None is bit-identical to all ones."""
    data, model = _data(8), tiny_neox()
    before = initial_params(model)
    a = train(model, data, _cfg()).params
    b = train(model, data, _cfg(), torch.ones(len(data))).params
    c = train(model, data, _cfg(), torch.ones(len(data), data.max_length)).params
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
        assert torch.equal(before[k], dict(model.named_parameters())[k]), k


def test_two_runs_are_bit_identical():
    data, model = _data(8), tiny_neox()
    w = torch.linspace(0.5, 1.5, len(data))
    a = train(model, data, _cfg(optimizer="muon"), w).params
    b = train(model, data, _cfg(optimizer="muon"), w).params
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("reduction", ["sum_of_means", "mean"])
def test_zero_weight_equals_removal(reduction):
    """Weight 0 for doc j == training without j in its batch, where for "mean" the
    batch loss keeps j's tokens in the denominator: loss_without_j * D_without / D_with.
    (SGD so the scaled-loss reference is exact; sum_of_means needs no rescaling.)"""
    data, model = _data(8), tiny_neox()
    cfg = _cfg(optimizer="sgd", loss_reduction=reduction, lr_schedule=LRScheduleConfig(lr=0.2))
    j = batch_order(len(data), 4, 1, cfg.seed)[0].rows[1]
    w = torch.ones(len(data))
    w[j] = 0.0
    ours = train(model, data, cfg, w).params

    def loss_without_j(m, d, rows):
        keep = [r for r in rows if r != j]
        ids, labels = collate(d, keep)
        logits = m(input_ids=ids).logits[:, :-1].float()
        tok = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")
        valid = labels[:, 1:] != -100
        if reduction == "sum_of_means":
            return (tok.sum(1) / valid.sum(1).clamp_min(1)).sum()
        d_with = int((collate(d, rows)[1][:, 1:] != -100).sum())
        return tok.sum() / d_with

    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=cfg.adam_beta1, weight_decay=0.01)
    _assert_close(ours, _reference(model, data, cfg, opt, loss_without_j))


@pytest.mark.parametrize("reduction", ["mean", "sum_of_means"])
def test_grad_accum_matches_full_batch(reduction):
    """grad_accum_steps 2 and 3 (uneven split) == 1, to fp32 tolerance (adam_eps=1e-6:
    see test_adamw_equals_torch_adamw)."""
    data, model = _data(8), tiny_neox()
    w = torch.linspace(0.2, 1.8, len(data))
    kw = dict(loss_reduction=reduction, max_grad_norm=0.5, adam_eps=1e-6)
    full = train(model, data, _cfg(**kw), w).params
    for k in (2, 3):
        _assert_close(full, train(model, data, _cfg(grad_accum_steps=k, **kw), w).params)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "muon"])
def test_metagradient_matches_finite_difference(optimizer):
    """d(query loss after 3 steps)/d(weight_i) by autograd through training == central
    finite difference, in float64."""
    torch.manual_seed(0)
    model = tiny_neox(hidden=8, layers=1, intermediate=8).double()
    data, query = _data(6), _data(3, seed=7)
    extra = {"adam_eps": 1e-6, "eps_root": 1e-8} if optimizer != "sgd" else {}
    cfg = TrainingConfig(
        batch_size=2, optimizer=optimizer, save_mode="final", max_grad_norm=5.0,
        lr_schedule=LRScheduleConfig(lr=0.05 if optimizer == "sgd" else 1e-2), **extra,
    )  # fmt: skip

    def objective(w: torch.Tensor, graph: bool) -> torch.Tensor:
        params = train(model, data, cfg, w, create_graph=graph).params
        return doc_losses(model, params, query).mean()

    w = torch.linspace(0.5, 1.5, len(data), dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(w, True), w)
    h = 1e-5
    with torch.no_grad():
        for i in (0, 3):
            e = torch.zeros_like(w)
            e[i] = h
            fd = (objective(w + e, False) - objective(w - e, False)) / (2 * h)
            assert abs(float(fd) - float(grad[i])) <= 1e-5 * max(1.0, abs(float(fd))), (i, fd, grad)
    assert grad.abs().max() > 0


def test_checkpoint_callback_follows_schedule():
    data, model = _data(8), tiny_neox()
    seen: list[int] = []
    cfg = dataclasses.replace(_cfg(num_epochs=2), save_mode="all")
    res = train(model, data, cfg, on_checkpoint=lambda s, p, st: seen.append(s))
    assert seen == checkpoint_steps(4, "all") == [0, 1, 2, 3] == res.checkpoints
    assert [h["step"] for h in res.log_history] == [1, 2, 3, 4]
    assert res.opt_state["step"] == 4


def test_checkpoint_schedules_known_values():
    assert checkpoint_steps(10, "final") == [10]
    assert checkpoint_steps(10, "interval", 5) == [0, 5, 10]
    assert checkpoint_steps(10, "interval", 3) == [0, 3, 6, 9]
    assert checkpoint_steps(10, "sqrt") == [0, 3, 6, 9]
    assert checkpoint_steps(16, "sqrt") == [0, 4, 8, 12, 13, 14, 15]
    assert checkpoint_steps(10, "log") == [0, 5, 7, 8, 9]


def test_batch_order_shuffles_each_epoch_and_pads():
    import numpy as np

    order = batch_order(10, 4, 2, seed=42)
    flat = [r for b in order for r in b.rows]
    assert flat[:10] == np.random.default_rng(42).permutation(10).tolist()
    assert flat[10:20] == np.random.default_rng(43).permutation(10).tolist()
    assert len(order) == 5 and order[-1].pad == 0 and order[0].pad == 0
    odd = batch_order(10, 4, 1, seed=0)
    assert odd[-1].pad == 2 and odd[-1].rows[-1] == odd[-1].rows[-2] == odd[-1].rows[-3]


def test_bad_configs_are_one_sentence():
    for kw, flag in [
        ({"batch_size": 0}, "--batch_size"),
        ({"optimizer": "adagrad"}, "--optimizer"),
        ({"lr_schedule": LRScheduleConfig(lr=1e-3)} | {"grad_accum_steps": 0}, "--grad_accum"),
        ({"save_mode": "interval"}, "--save_interval"),
    ]:
        with pytest.raises(BadInputError, match=flag):
            TrainingConfig(**kw)
    with pytest.raises(BadInputError, match="--lr"):
        LRScheduleConfig(lr=-1.0)
    with pytest.raises(ValueError, match="weights"):
        train(tiny_neox(), _data(4), _cfg(), torch.ones(3))
    assert dataclasses.replace(_cfg(), seed=3).seed == 3


def test_metasmoothness_score_and_probe():
    from bergson_ray.training.metasmoothness import direction, measure, score

    t0, a = torch.zeros(6), torch.randn(6)
    assert score(t0, t0 + a, t0 + 2 * a) == pytest.approx(1.0)
    assert score(t0, t0 + a, t0 + 0.5 * a) == pytest.approx(-1.0)
    # bergson draws one extra (pad) entry when the stream is padded; the prefix is v
    g = torch.Generator().manual_seed(5)
    assert torch.equal(direction(10, 4, 1, 5), torch.randn(11, generator=g)[:10])
    out = measure(tiny_neox(), _data(8), _cfg(optimizer="sgd"), fd_step=0.1)
    assert out["score"] > 0.9 and out["total_movement_l1"] > 0
