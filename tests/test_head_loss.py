"""The chunked LM-head loss against the dense loss on full logits (``head_loss.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import pad_batch, random_docs, tiny_gpt2, tiny_neox
from torch.utils._python_dispatch import TorchDispatchMode

from bergson_ray.config import GradientConfig, HessianConfig
from bergson_ray.gradients import engine as engine_mod
from bergson_ray.gradients.engine import GradientEngine
from bergson_ray.gradients.head_loss import (
    chunked_label_log_probs,
    chunked_token_losses,
    head_split,
    last_hidden,
)
from bergson_ray.gradients.losses import (
    mean_label_probability,
    mean_of_label_probabilities,
    next_token_targets,
    scale_logits,
    token_log_odds_loss,
)
from bergson_ray.hessians import fisher as fisher_mod
from bergson_ray.hessians.fisher import fisher_loss, fisher_loss_from_hidden, sample_labels


def dense_losses(hidden, head, targets, loss_fn, smoothing):
    logits = head(hidden).float()
    if loss_fn == "log_odds":
        return token_log_odds_loss(logits, targets)
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="none",
        label_smoothing=smoothing,
    )
    return flat.view(targets.shape)


@pytest.mark.parametrize("loss_fn,smoothing", [("ce", 0.0), ("ce", 0.1), ("log_odds", 0.0)])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_losses_and_hidden_gradients_equal_the_dense_loss(loss_fn, smoothing, chunk, bias):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 37, bias=bias)
    hidden = torch.randn(3, 7, 8, generator=g)
    targets = torch.randint(0, 37, (3, 7), generator=g)
    targets[0, 4:] = -100  # padding and prompt positions carry no loss
    targets[2, :2] = -100
    upstream = torch.rand(3, 7, generator=g) * 3  # any weighting: mean, advantages

    h_dense = hidden.clone().requires_grad_(True)
    want = dense_losses(h_dense, head, targets, loss_fn, smoothing)
    (want * upstream).sum().backward()

    h_chunked = hidden.clone().requires_grad_(True)
    got = chunked_token_losses(
        h_chunked, head, targets, loss_fn=loss_fn, label_smoothing=smoothing, chunk=chunk
    )
    (got * upstream).sum().backward()

    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_chunked.grad, h_dense.grad, rtol=1e-5, atol=1e-6)
    assert bool((got[targets == -100] == 0).all())
    assert bool((h_chunked.grad[targets == -100] == 0).all())


def test_bf16_hidden_gradients_follow_the_dense_loss():
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    hidden = torch.randn(2, 9, 16, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 50, (2, 9), generator=g)
    h_dense = hidden.clone().requires_grad_(True)
    dense_losses(h_dense, head, targets, "ce", 0.0).sum().backward()
    h_chunked = hidden.clone().requires_grad_(True)
    chunked_token_losses(h_chunked, head, targets, chunk=4).sum().backward()
    assert h_chunked.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h_chunked.grad.float(), h_dense.grad.float(), rtol=2e-2, atol=1e-3)


def test_head_split_only_where_the_logits_are_the_head_of_the_base_model():
    neox, gpt2 = tiny_neox(), tiny_gpt2()
    assert head_split(neox) == (neox.gpt_neox, neox.get_output_embeddings())
    assert head_split(gpt2) == (gpt2.transformer, gpt2.lm_head)

    hooked = tiny_neox()
    handle = scale_logits(hooked, 2.0)  # --logit_scale: a hook on the head
    assert head_split(hooked) is None
    handle.remove()
    assert head_split(hooked) is not None

    class Wrapped(type(neox)):  # a user's subclass may change the forward
        pass

    assert head_split(Wrapped(neox.config)) is None
    capped = tiny_neox()
    capped.config.final_logit_softcapping = 30.0
    assert head_split(capped) is None
    other = tiny_neox()
    other.config.model_type = "gemma2"
    assert head_split(other) is None


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op produced while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("arch", ["neox", "gpt2"])
@pytest.mark.parametrize("loss_fn,smoothing", [("ce", 0.0), ("ce", 0.1), ("log_odds", 0.0)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_engine_rows_equal_the_full_logit_loss_without_its_logits(
    arch, loss_fn, smoothing, reduction, monkeypatch
):
    """The engine's rows, per document and per token, are those of the full-logit loss,
    while no tensor as large as the batch's logits is ever made."""
    vocab = 512
    make = tiny_neox if arch == "neox" else tiny_gpt2
    model = make(vocab=vocab)
    docs = random_docs((30, 17, 24, 3), vocab=vocab)
    batch = pad_batch(docs, prompt_lens=[0, 4, 2, 0])
    batch.advantage = torch.tensor([1.0, -0.5, 2.0, 1.0])
    logit_count = batch.input_ids.numel() * vocab
    monkeypatch.setattr("bergson_ray.gradients.head_loss.CHUNK_BYTES", 4 * vocab * 16)
    for tokens in (False, True):
        cfg = GradientConfig(
            loss_fn=loss_fn,
            label_smoothing=smoothing,
            loss_reduction=reduction,
            projection_dim=4,
            attribute_tokens=tokens,
        )
        engine = GradientEngine(model, cfg)
        with LargestTensor() as seen:
            chunked = engine.compute(batch)
        assert seen.largest < logit_count / 2  # the model's own weights are [V, H]
        with monkeypatch.context() as m:
            m.setattr(engine_mod, "head_split", lambda model: None)
            with LargestTensor() as seen_dense:
                dense = engine.compute(batch)
            assert seen_dense.largest >= logit_count  # the reference path makes them
        torch.testing.assert_close(chunked.loss, dense.loss, rtol=1e-5, atol=1e-6)
        got = chunked.token_rows if tokens else chunked.rows
        want = dense.token_rows if tokens else dense.rows
        scale = want.abs().max()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(scale))


@pytest.mark.parametrize("use_dataset_labels", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fisher_loss_from_hidden_samples_the_same_labels_and_gradients(
    use_dataset_labels, reduction, monkeypatch
):
    """The true Fisher's labels are drawn from the chunked logits with the dense path's
    uniforms: the same labels (a different one would move the loss by O(1)), the same
    loss and the same gradients of the hidden states."""
    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(8, 40, bias=False)
    hidden = torch.randn(3, 6, 8, generator=g) * 3
    labels = torch.randint(0, 40, (3, 6), generator=g)
    labels[1, :2] = -100  # a prompt
    lengths = torch.tensor([6, 5, 3])
    labels[1, 5:] = labels[2, 3:] = -100  # padding
    doc_ids = torch.tensor([7, 0, 3])
    kw = dict(doc_ids=doc_ids, use_dataset_labels=use_dataset_labels, reduction=reduction)

    h_dense = hidden.clone().requires_grad_(True)
    want = fisher_loss(head(h_dense), labels, lengths, **kw)
    want.backward()
    monkeypatch.setattr("bergson_ray.gradients.head_loss.CHUNK_BYTES", 4 * 40 * 4)
    h_chunked = hidden.clone().requires_grad_(True)
    got = fisher_loss_from_hidden(h_chunked, head, labels, lengths, **kw)
    got.backward()
    torch.testing.assert_close(got, want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h_chunked.grad, h_dense.grad, rtol=1e-5, atol=1e-6)

    dense = sample_labels(head(hidden), labels, lengths, doc_ids)[:, 1:]
    drawn = []
    inner = fisher_mod.inverse_cdf_labels
    monkeypatch.setattr(fisher_mod, "inverse_cdf_labels", lambda z, u: drawn.append(inner(z, u)) or drawn[-1])
    fisher_loss_from_hidden(hidden, head, labels, lengths, **kw)
    if use_dataset_labels:
        assert not drawn
    else:
        assert torch.equal(torch.cat(drawn), dense[dense != -100])


@pytest.mark.parametrize("method", ["kfac", "tkfac"])
def test_factor_fits_equal_the_full_logit_fit(method, monkeypatch):
    """Hessian factors fitted with the chunked head equal those fitted on whole logits."""
    from bergson_ray.hessians import fitter as fitter_mod

    vocab = 300
    model = tiny_neox(vocab=vocab)
    docs = random_docs((12, 7, 9), vocab=vocab)
    batch = pad_batch(docs, prompt_lens=[0, 3, 0])
    hcfg = HessianConfig(method=method)
    monkeypatch.setattr("bergson_ray.gradients.head_loss.CHUNK_BYTES", 4 * vocab * 5)

    def fitted(split: bool):
        with monkeypatch.context() as m:
            if not split:
                m.setattr(fitter_mod, "head_split", lambda model: None)
            f = fitter_mod.FactorFitter(model, GradientConfig(), hcfg)
            with LargestTensor() as seen:
                f.accumulate_batch(batch, torch.arange(len(docs)))
        return f.state_dicts(), seen.largest

    (chunked, largest), (dense, largest_dense) = fitted(True), fitted(False)
    assert largest < batch.input_ids.numel() * vocab <= largest_dense
    for name, state in dense.items():
        for key, want in state.items():
            torch.testing.assert_close(chunked[name][key], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("arch", ["neox", "gpt2"])
def test_label_probabilities_equal_the_full_logit_ones(arch, monkeypatch):
    """TRAK's ``p`` per document from chunked label log-probabilities equals
    ``mean_label_probability`` on whole logits, with no tensor as large as the logits."""
    vocab = 512
    model = (tiny_neox if arch == "neox" else tiny_gpt2)(vocab=vocab).eval()  # no dropout
    batch = pad_batch(random_docs((30, 17, 24, 1), vocab=vocab), prompt_lens=[0, 4, 2, 0])
    monkeypatch.setattr("bergson_ray.gradients.head_loss.CHUNK_BYTES", 4 * vocab * 16)
    with torch.no_grad():
        want, count = mean_label_probability(model(batch.input_ids).logits, batch.labels)
        body, head = head_split(model)
        with LargestTensor() as seen:
            log_p = chunked_label_log_probs(
                last_hidden(body, batch.input_ids), head, next_token_targets(batch.labels)
            )
        got, got_count = mean_of_label_probabilities(log_p[:, :-1], batch.labels)
    assert seen.largest < batch.input_ids.numel() * vocab / 2
    assert torch.equal(got_count, count) and count[-1] == 0 and got[-1] == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
