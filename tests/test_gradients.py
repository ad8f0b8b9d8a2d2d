"""The engine's per-example gradients against autograd ground truth.

Ground truth: each document alone, weights unfrozen, ``loss.backward()``, read
``module.weight.grad`` (and ``bias.grad``). No Ray here.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import pad_batch, random_docs, tiny_gpt2, tiny_neox

from bergson_ray.config import AttentionConfig, GradientConfig
from bergson_ray.errors import BadInputError
from bergson_ray.gradients.engine import GradientEngine
from bergson_ray.gradients.losses import per_document_loss
from bergson_ray.gradients.modules import Conv1D, find_target_modules, weight_as_out_in
from bergson_ray.gradients.normalizers import AdafactorNormalizer, AdamNormalizer
from bergson_ray.gradients.projection import global_projection_matrix, projection_matrix

MODELS = {"neox": tiny_neox, "gpt2": tiny_gpt2}
DOC_LENGTHS = (9, 5, 12, 2)


def ground_truth(model, modules, doc, cfg: GradientConfig, prompt_len=0):
    """Full [O, I(+1)] gradient per module for one document alone."""
    model.zero_grad()
    model.requires_grad_(True)
    batch = pad_batch([doc], prompt_len)
    logits = model(batch.input_ids).logits
    per_document_loss(logits, batch.labels, reduction=cfg.loss_reduction).sum().backward()
    out = {}
    for name, mod in modules.items():
        w = mod.weight.grad
        g = w.t() if isinstance(mod, Conv1D) else w  # HF Conv1D stores [I, O]
        if cfg.include_bias and mod.bias is not None:
            g = torch.cat([g, mod.bias.grad[:, None]], dim=1)
        out[name] = g.detach().clone()
    model.zero_grad()
    model.requires_grad_(False)
    return out


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("arch", ["neox", "gpt2"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_unprojected_rows_equal_autograd(arch, bias, reduction):
    model = MODELS[arch]()
    cfg = GradientConfig(include_bias=bias, loss_reduction=reduction)
    engine = GradientEngine(model, cfg)
    docs = random_docs(DOC_LENGTHS)
    res = engine.compute(pad_batch(docs))
    modules = find_target_modules(model, cfg)
    for i, doc in enumerate(docs):
        truth = ground_truth(model, modules, doc, cfg)
        col = 0
        for name, size in engine.grad_sizes.items():
            got = res.rows[i, col : col + size]
            col += size
            want = truth[name].reshape(-1)
            assert got.shape == want.shape, name
            assert rel_err(got, want) < 1e-5, (name, i, rel_err(got, want))
        assert col == engine.dim


@pytest.mark.parametrize("bias", [False, True])
def test_projected_rows_equal_LGRt(bias):
    model = tiny_neox()
    p = 4
    cfg = GradientConfig(projection_dim=p, include_bias=bias)
    engine = GradientEngine(model, cfg)
    docs = random_docs(DOC_LENGTHS)
    res = engine.compute(pad_batch(docs))
    modules = find_target_modules(model, cfg)
    for i, doc in enumerate(docs):
        truth = ground_truth(model, modules, doc, cfg)
        col = 0
        for name, size in engine.grad_sizes.items():
            G = truth[name]
            L = projection_matrix(f"{name}/left", p, G.shape[0])
            R = projection_matrix(f"{name}/right", p, G.shape[1])
            want = (L @ G @ R.T).reshape(-1)
            got = res.rows[i, col : col + size]
            col += size
            assert rel_err(got, want) < 1e-5, (name, rel_err(got, want))


def test_rademacher_matrix_is_seeded_by_identifier_and_jl_scaled():
    a = projection_matrix("m/left", 8, 20)
    b = projection_matrix("m/left", 8, 20)
    c = projection_matrix("m/right", 8, 20)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose((a * math.sqrt(8)).abs(), torch.ones_like(a))
    assert (a > 0).any() and (a < 0).any()


def test_per_token_rows_sum_to_sequence_row():
    model = tiny_neox()
    for p in (0, 4):
        cfg = GradientConfig(projection_dim=p, include_bias=True)
        seq = GradientEngine(model, cfg).compute(pad_batch(random_docs(DOC_LENGTHS)))
        tok_cfg = GradientConfig(projection_dim=p, include_bias=True, attribute_tokens=True)
        tok = GradientEngine(model, tok_cfg).compute(pad_batch(random_docs(DOC_LENGTHS)))
        counts = tok.token_counts.tolist()
        assert counts == [max(n - 1, 0) for n in (9, 5, 12, 2)]
        starts = [0] + list(torch.tensor(counts).cumsum(0)[:-1].tolist())
        for i, (s, c) in enumerate(zip(starts, counts)):
            assert rel_err(tok.token_rows[s : s + c].sum(0), seq.rows[i]) < 1e-5


def test_prompt_positions_carry_no_loss_but_still_gradient():
    """With the prompt masked, the gradient equals the completion-only loss's gradient."""
    model = tiny_neox()
    cfg = GradientConfig()
    docs = random_docs((10, 8))
    res = GradientEngine(model, cfg).compute(pad_batch(docs, 4))
    modules = find_target_modules(model, cfg)
    for i, doc in enumerate(docs):
        truth = ground_truth(model, modules, doc, cfg, prompt_len=4)
        want = torch.cat([truth[n].reshape(-1) for n in modules])
        assert rel_err(res.rows[i], want) < 1e-5
    full = GradientEngine(model, cfg).compute(pad_batch(docs))
    assert rel_err(full.rows[0], res.rows[0]) > 1e-3  # the mask changed something


def test_batch_composition_does_not_change_rows():
    model = tiny_neox()
    eng = GradientEngine(model, GradientConfig(projection_dim=4))
    docs = random_docs((9, 5, 12, 7))
    together = eng.compute(pad_batch(docs)).rows
    alone = torch.cat([eng.compute(pad_batch([d])).rows for d in docs])
    assert rel_err(together, alone) < 1e-5


@pytest.mark.parametrize("p", [0, 4])
def test_adam_normalizer_divides_full_gradient(p):
    model = tiny_neox()
    cfg = GradientConfig(projection_dim=p, include_bias=True)
    modules = find_target_modules(model, cfg)
    g = torch.Generator().manual_seed(3)
    norms = {}
    for name, mod in modules.items():
        o, i = weight_as_out_in(mod).shape
        norms[name] = AdamNormalizer(
            torch.rand(o, i, generator=g) + 0.1, torch.rand(o, generator=g) + 0.1
        )
    eng = GradientEngine(model, cfg, normalizers=norms)
    doc = random_docs((9,))[0]
    row = eng.compute(pad_batch([doc])).rows[0]
    truth = ground_truth(model, modules, doc, cfg)
    col = 0
    for name, size in eng.grad_sizes.items():
        n = norms[name]
        scale = torch.cat([n.weight_scale(), n.bias_scale()[:, None]], dim=1)
        G = truth[name] * scale
        if p:
            L = projection_matrix(f"{name}/left", p, G.shape[0])
            R = projection_matrix(f"{name}/right", p, G.shape[1])
            G = L @ G @ R.T
        assert rel_err(row[col : col + size], G.reshape(-1)) < 1e-5
        col += size


@pytest.mark.parametrize("p", [0, 4])
def test_adafactor_normalizer_equals_rank1_scaling(p):
    model = tiny_neox()
    cfg = GradientConfig(projection_dim=p, include_bias=True)
    modules = find_target_modules(model, cfg)
    g = torch.Generator().manual_seed(4)
    norms = {}
    for name, mod in modules.items():
        o, i = weight_as_out_in(mod).shape
        norms[name] = AdafactorNormalizer(
            torch.rand(o, generator=g) + 0.1,
            torch.rand(i, generator=g) + 0.1,
            torch.rand(o, generator=g) + 0.1,
        )
    eng = GradientEngine(model, cfg, normalizers=norms)
    doc = random_docs((9,))[0]
    row = eng.compute(pad_batch([doc])).rows[0]
    truth = ground_truth(model, modules, doc, cfg)
    col = 0
    for name, size in eng.grad_sizes.items():
        n = norms[name]
        G, b = truth[name][:, :-1], truth[name][:, -1]
        G = n.row_scale()[:, None] * G * n.col_scale()[None, :]
        G = torch.cat([G, (b * n.bias_scale())[:, None]], dim=1)
        if p:
            L = projection_matrix(f"{name}/left", p, G.shape[0])
            R = projection_matrix(f"{name}/right", p, G.shape[1])
            G = L @ G @ R.T
        assert rel_err(row[col : col + size], G.reshape(-1)) < 1e-5
        col += size


def test_attention_head_split_concatenates_to_module_gradient():
    model = tiny_neox()
    name = "layers.0.attention.query_key_value"
    cfg = GradientConfig(
        split_attention_modules=[name], attention=AttentionConfig(num_heads=4, head_size=24)
    )
    eng = GradientEngine(model, cfg)
    assert [k for k in eng.grad_sizes if k.startswith(name)] == [
        f"{name}.head_{h}" for h in range(4)
    ]
    split = eng.compute(pad_batch(random_docs(DOC_LENGTHS))).rows
    whole = GradientEngine(model, GradientConfig()).compute(pad_batch(random_docs(DOC_LENGTHS))).rows
    # heads are row blocks of the [O, I] gradient; the flattened concatenation is identical
    assert rel_err(split, whole) < 1e-6


def test_global_projection_is_sum_of_per_module_single_projections():
    model = tiny_neox()
    p = 8
    cfg = GradientConfig(projection_dim=p, projection_target="global")
    eng = GradientEngine(model, cfg)
    assert eng.grad_sizes == {"gradients": p}
    docs = random_docs(DOC_LENGTHS)
    res = eng.compute(pad_batch(docs))
    full_eng = GradientEngine(model, GradientConfig())
    full = full_eng.compute(pad_batch(docs)).rows
    want = torch.zeros(len(docs), p)
    col = 0
    for name, size in full_eng.grad_sizes.items():
        # version 2 (the default) generates global matrices in blocks named "<id>/<start>"
        S = global_projection_matrix(f"{name}/single", p, size)
        want += full[:, col : col + size] @ S.T
        col += size
    assert rel_err(res.rows, want) < 1e-5


def test_module_filters_and_errors():
    model = tiny_neox()
    mods = find_target_modules(model, GradientConfig(filter_modules="*mlp*"))
    assert mods and not any("mlp" in m for m in mods)
    only = find_target_modules(model, GradientConfig(modules=["layers.1.*"]))
    assert all(m.startswith("layers.1.") for m in only)
    with pytest.raises(BadInputError, match="matches no module"):
        find_target_modules(model, GradientConfig(filter_modules="nonexistent.*"))


def test_advantage_scales_each_document_gradient():
    """GRPO: the loss of document b is A_b * CE_b, so its gradient is A_b times the plain one."""
    model = tiny_neox()
    eng = GradientEngine(model, GradientConfig(projection_dim=4))
    docs = random_docs((9, 5, 12))
    plain = eng.compute(pad_batch(docs)).rows
    batch = pad_batch(docs)
    batch.advantage = torch.tensor([0.5, -2.0, 0.0])
    weighted = eng.compute(batch).rows
    assert rel_err(weighted, plain * batch.advantage[:, None]) < 1e-5


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("p", [0, 4])
def test_rows_written_in_place_equal_concatenated_blocks(p, per_token):
    """The engine writes each block into its columns of one row tensor (``begin(flat=True)``);
    block by block and concatenated (the collector's other consumers) gives the same
    bytes, with split heads, biases and an Adam normalizer in the mix."""
    model = tiny_neox()
    qkv = "layers.0.attention.query_key_value"
    cfg = GradientConfig(
        projection_dim=p, include_bias=True, attribute_tokens=per_token,
        split_attention_modules=[qkv], attention=AttentionConfig(num_heads=4, head_size=24),
    )  # fmt: skip
    modules = find_target_modules(model, cfg)
    o, i = weight_as_out_in(modules[qkv]).shape
    g = torch.Generator().manual_seed(5)
    norms = {qkv: AdamNormalizer(torch.rand(o, i, generator=g) + 0.1, torch.rand(o, generator=g) + 0.1)}
    eng = GradientEngine(model, cfg, normalizers=norms)
    batch = pad_batch(random_docs(DOC_LENGTHS))
    res = eng.compute(batch)
    flat = res.token_rows if per_token else res.rows
    col = eng.collector
    begin = col.begin
    col.begin = lambda mask, flat=False: begin(mask, flat=False)  # the same engine, blocks apart
    blocks = eng.compute(batch)
    apart = blocks.token_rows if per_token else blocks.rows
    assert flat.shape == apart.shape and flat.shape[1] == sum(eng.grad_sizes.values())
    assert torch.equal(flat, apart)
