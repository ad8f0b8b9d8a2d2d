"""True-Fisher label sampling and padding: batching must not change the factors."""

from __future__ import annotations

import pytest
import torch
from helpers import pad_batch, rel
from test_hessian_groundtruth import GCFG, fit, make_docs, tiny_neox

from bergson_ray.config import HessianConfig
from bergson_ray.hessians.fisher import fisher_loss, sample_labels


def test_sampled_labels_follow_model_and_mask():
    """Only labelled real positions get a sample; frequencies follow softmax(logits)."""
    v, n = 5, 20000
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = probs.log()[None, None].repeat(n, 4, 1)
    labels = torch.tensor([[3, -100, 2, 1]]).repeat(n, 1)  # position 1 has no dataset label
    out = sample_labels(logits, labels, torch.full((n,), 3), torch.arange(n))
    assert (out[:, [0, 1, 3]] == -100).all()  # unlabelled, and beyond the length
    freq = torch.bincount(out[:, 2], minlength=v) / n
    assert torch.allclose(freq, probs, atol=0.01)


def test_sampled_labels_independent_of_padding_and_neighbours():
    model = tiny_neox()
    docs = make_docs()
    alone = []
    for j, d in enumerate(docs):
        b = pad_batch([d])
        logits = model(b.input_ids).logits
        alone.append(sample_labels(logits, b.labels, b.lengths, torch.tensor([j]))[0])
    b = pad_batch(docs)
    packed = sample_labels(model(b.input_ids).logits, b.labels, b.lengths, torch.arange(len(docs)))
    for j, d in enumerate(docs):
        assert torch.equal(packed[j, : len(d)], alone[j])
        assert (packed[j, len(d) :] == -100).all()
    # a different document id (or seed) gives different labels
    other = sample_labels(
        model(b.input_ids).logits, b.labels, b.lengths, torch.arange(len(docs)) + 100
    )
    assert not torch.equal(other, packed)


@pytest.mark.parametrize("method", ["kfac", "tkfac"])
@pytest.mark.parametrize("use_dataset_labels", [False, True])
def test_padded_batch_equals_unpadded_documents(method, use_dataset_labels):
    """Padding positions contribute nothing: one padded batch = each document alone."""
    model, docs = tiny_neox(), make_docs()
    hcfg = HessianConfig(method=method, use_dataset_labels=use_dataset_labels)
    padded = fit(model, docs, hcfg, GCFG)
    alone = fit(model, docs, hcfg, GCFG, batches=[[j] for j in range(len(docs))])
    for name, acc in padded.accumulators.items():
        a, b = acc.state_dict(), alone.accumulators[name].state_dict()
        for key in a:
            assert rel(a[key], b[key]) < 1e-5, (name, key)


def test_padding_token_values_do_not_matter():
    """Garbage in the padding (instead of id 0) changes nothing: causal attention + no loss."""
    model, docs = tiny_neox(), make_docs()
    hcfg = HessianConfig(method="kfac")
    from bergson_ray.hessians.fitter import FactorFitter

    ref = fit(model, docs, hcfg, GCFG)
    b = pad_batch(docs)
    pad = torch.arange(b.input_ids.shape[1])[None] >= b.lengths[:, None]
    b.input_ids[pad] = torch.randint(2, 50, (int(pad.sum()),))
    f = FactorFitter(model, GCFG, hcfg)
    f.accumulate_batch(b, torch.arange(len(docs)))
    for name, acc in f.accumulators.items():
        assert rel(acc.state_dict()["S"], ref.accumulators[name].state_dict()["S"]) < 1e-5


def test_mean_reduction_scales_each_document_by_root_count():
    model, docs = tiny_neox(), make_docs(lengths=(6,))
    b = pad_batch(docs)
    logits = model(b.input_ids).logits
    s = fisher_loss(logits, b.labels, b.lengths, use_dataset_labels=True)
    m = fisher_loss(logits, b.labels, b.lengths, use_dataset_labels=True, reduction="mean")
    assert torch.allclose(m, s / 5**0.5)
