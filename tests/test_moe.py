"""``--moe_experts``: fused MoE experts tracked per expert, and the coverage report.

transformers 5 keeps the experts of Mixtral / Qwen-MoE / OLMoE / gpt-oss in 3-D
parameters. With ``--moe_experts`` each expert's projections become modules; their
per-example gradients must equal autograd's gradient of that expert's slice of the
fused parameter, with zero rows for experts a document never routed to. Tiny random
MoE models are made locally (hidden 16, 2 layers, 4 experts, top-2).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import anchor
import numpy as np
import pytest
import torch
import yaml
from helpers import VOCAB, assert_same, pad_batch, random_docs, rows_of, tiny_neox

from bergson_ray.config import BatchConfig, DataConfig, GradientConfig, ModelConfig
from bergson_ray.errors import BadInputError
from bergson_ray.gradients import modules as modules_mod
from bergson_ray.gradients.engine import GradientEngine
from bergson_ray.gradients.losses import per_document_loss
from bergson_ray.gradients.modules import find_target_modules, log_coverage, parameter_coverage
from bergson_ray.utils.columns import column_offsets

GLOB = "model.layers.*.mlp.experts"


def tiny_moe(
    kind: str = "mixtral",
    *,
    vocab: int = VOCAB,
    seed: int = 0,
    max_pos: int = 64,
    eager: bool = True,
):
    """A random tiny MoE causal LM (``eager``: transformers' loop over experts, which
    runs in fp64 too; else its default grouped matmul)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_pos,
        **({"experts_implementation": "eager"} if eager else {}),
    )  # fmt: skip
    if kind == "mixtral":
        cfg = tf.MixtralConfig(
            **common, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2
        )
        return tf.MixtralForCausalLM(cfg)
    if kind == "qwen2_moe":  # plus a shared expert (plain Linears) and a shared gate
        cfg = tf.Qwen2MoeConfig(
            **common, moe_intermediate_size=24, shared_expert_intermediate_size=24,
            intermediate_size=24, num_experts=4, num_experts_per_tok=2,
        )  # fmt: skip
        return tf.Qwen2MoeForCausalLM(cfg)
    if kind == "gpt_oss":  # experts stored [E, in, out] (is_transposed), with biases
        cfg = tf.GptOssConfig(
            **common, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
            head_dim=4, layer_types=["full_attention"] * 2,
        )  # fmt: skip
        return tf.GptOssForCausalLM(cfg)
    raise ValueError(kind)


def _routing(model, input_ids) -> dict[int, torch.Tensor]:
    """Layer -> ``top_k_index [N*S, k]`` that transformers' router hands the experts."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.experts.register_forward_pre_hook(
            lambda _m, args, i=i: seen.__setitem__(i, args[1].detach().clone())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(input_ids)
    for h in hooks:
        h.remove()
    return seen


# ------------------------------------------------------------------ gradients = autograd


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_per_expert_gradients_equal_autograd_of_the_fused_slice(kind):
    model = tiny_moe(kind).double()
    ref = copy.deepcopy(model)  # the unexpanded model: transformers' own fused forward
    docs = random_docs([9, 2, 6, 4])  # doc 1 has one loss position: two experts unused
    batch = pad_batch(docs)
    bias = kind == "gpt_oss"
    cfg = GradientConfig(moe_experts=GLOB, include_bias=bias)
    engine = GradientEngine(model, cfg)
    rows = engine.compute(batch).rows.double()

    fused = {n: p for n, p in ref.named_parameters() if ".experts." in n}
    for p in fused.values():
        p.requires_grad_(True)
    loss = per_document_loss(ref(batch.input_ids).logits, batch.labels)
    names = list(fused)
    per_doc = [
        dict(zip(names, torch.autograd.grad(loss[i], list(fused.values()), retain_graph=True)))
        for i in range(len(docs))
    ]
    routing = _routing(ref, batch.input_ids)
    seq = batch.input_ids.shape[1]

    offsets = column_offsets(engine.grad_sizes)
    experts = [k for k in offsets if ".experts.expert_" in k]
    assert len(experts) == 2 * 2 * 4  # layers x experts x (up, down)
    transposed = bool(ref.model.layers[0].mlp.experts.is_transposed)
    assert transposed == (kind == "gpt_oss")
    zero_rows = 0
    for key in experts:  # layers.<l>.mlp.experts.expert_<e>.<param>
        layer, e, param = int(key.split(".")[1]), int(key.split(".")[4][7:]), key.split(".")[-1]
        lo, hi = offsets[key]
        owner = f"model.layers.{layer}.mlp.experts.{param}"
        for i, doc in enumerate(docs):
            g = per_doc[i][owner][e]
            want = g.t() if transposed else g  # [out, in]
            if bias:
                want = torch.cat([want, per_doc[i][f"{owner}_bias"][e][:, None]], dim=1)
            got = rows[i, lo:hi].reshape(want.shape)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7 * want.abs().max())
            # routed at a loss-carrying position (every position but the last)?
            top = routing[layer].view(len(docs), seq, -1)[i, : len(doc) - 1]
            if not (top == e).any():
                assert torch.count_nonzero(got) == 0, f"{key}: doc {i} never routed here"
                zero_rows += 1
            else:
                assert got.abs().max() > 0
    assert zero_rows >= 8  # doc 1 alone leaves 2 of 4 experts unused in each layer


def test_expanded_model_computes_what_the_fused_one_does():
    model = tiny_moe("mixtral").double()
    ref = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mods = find_target_modules(model, GradientConfig(moe_experts=GLOB))
    ids = torch.stack(random_docs([7, 7, 7]))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-12, atol=1e-12)
    # bergson's module names, relative to the base model; parameters untouched
    assert "layers.1.mlp.experts.expert_3.down_proj" in mods
    assert model.state_dict().keys() == state.keys()
    # idempotent, and base-relative globs name the same layers
    again = find_target_modules(model, GradientConfig(moe_experts="layers.*.mlp.experts"))
    assert list(again) == list(mods) and all(again[k] is mods[k] for k in mods)


def test_an_expert_no_token_reaches_still_reports_a_zero_gradient():
    """Its taps must fire (else the collector misses a block), with ``g = 0`` everywhere."""
    from bergson_ray.gradients.hooks import ModuleTaps

    model = tiny_moe("mixtral")
    mods = find_target_modules(model, GradientConfig(moe_experts=GLOB))
    experts = model.model.layers[0].mlp.experts
    layer = {k: m for k, m in mods.items() if k.startswith("layers.0.mlp.experts.")}
    seen: dict[str, tuple] = {}

    class Record:
        def on_forward(self, name, module, a):
            seen[name] = (a,)

        def on_backward(self, name, module, g):
            seen[name] += (g,)

    x = torch.randn(2, 5, 16, requires_grad=True)
    index = torch.randint(0, 2, (10, 2))  # only experts 0 and 1 are ever picked
    index[:, 1] = 1 - index[:, 0]
    weights = torch.rand(10, 2)
    with ModuleTaps(layer, Record()):
        experts(x, index, weights).square().sum().backward()
    assert len(seen) == 8 and all(len(v) == 2 for v in seen.values())
    for e in range(4):
        a, g = seen[f"layers.0.mlp.experts.expert_{e}.gate_up_proj"]
        assert a.shape == (2, 5, 16) and g.shape == (2, 5, 48)  # back in [N, S, *]
        assert (g.abs().sum() > 0) == (e < 2) and (a.abs().sum() > 0) == (e < 2)


def test_per_token_rows_sum_to_the_document_row():
    model = tiny_moe("mixtral")
    batch = pad_batch(random_docs([8, 3, 5]))
    doc = GradientEngine(copy.deepcopy(model), GradientConfig(moe_experts=GLOB)).compute(batch)
    tok = GradientEngine(model, GradientConfig(moe_experts=GLOB, attribute_tokens=True)).compute(
        batch
    )
    sums = torch.stack([r.sum(0) for r in tok.token_rows.split(tok.token_counts.tolist())])
    assert_same(sums.numpy(), doc.rows.numpy(), tol=1e-5)


# ------------------------------------------------------------------------- coverage


def test_coverage_is_low_and_warns_without_moe_experts(caplog):
    model = tiny_moe("mixtral")
    params = dict(model.model.named_parameters())
    attention = sum(p.numel() for n, p in params.items() if "self_attn" in n)
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n)
    total = sum(p.numel() for n, p in params.items() if "embed_tokens" not in n)

    plain = find_target_modules(model, GradientConfig())
    cov = parameter_coverage(model, plain)
    assert (cov.tracked, cov.total) == (attention, total) and cov.share < 0.5
    with caplog.at_level(logging.INFO, logger="bergson_ray.gradients.modules"):
        log_coverage(model, plain, once=False)
    (rec,) = caplog.records
    assert rec.levelno == logging.WARNING
    assert f"fused MoE experts (pass --moe_experts '{GLOB}')" in rec.getMessage()

    caplog.clear()
    tracked = find_target_modules(model, GradientConfig(moe_experts=GLOB))
    cov = parameter_coverage(model, tracked)
    assert (cov.tracked, cov.total) == (attention + experts, total) and cov.share > 0.95
    with caplog.at_level(logging.INFO, logger="bergson_ray.gradients.modules"):
        log_coverage(model, tracked, once=False)
    (rec,) = caplog.records
    assert rec.levelno == logging.INFO and "gradients cover 98." in rec.getMessage()


def test_chosen_subsets_and_dense_models_do_not_warn():
    dense = tiny_neox()
    cov = parameter_coverage(dense, find_target_modules(dense, GradientConfig()))
    assert cov.share > 0.9 and not cov.low
    # a small --modules subset is the user's choice: reported, not warned about
    sub = find_target_modules(dense, GradientConfig(modules=["*.attention.dense"]))
    cov = parameter_coverage(dense, sub)
    assert cov.share < 0.5 and not cov.low and cov.untracked


# ------------------------------------------------------------------------ bad input


def test_bad_moe_experts_values_fail_with_one_sentence():
    with pytest.raises(BadInputError, match="matches no module; its fused experts modules are "
                       "matched by 'model.layers.\\*.mlp.experts'"):  # fmt: skip
        find_target_modules(tiny_moe(), GradientConfig(moe_experts="model.layers.*.moe"))
    with pytest.raises(BadInputError, match="holds no fused 3-D expert parameters"):
        find_target_modules(tiny_moe(), GradientConfig(moe_experts="model.layers.*.self_attn"))
    with pytest.raises(BadInputError, match="this model has no fused MoE experts modules"):
        find_target_modules(tiny_neox(), GradientConfig(moe_experts="*.mlp"))
    with pytest.raises(BadInputError, match="no per-expert moments"):
        GradientConfig(moe_experts=GLOB, optimizer_state="opt.pt")


# ----------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe") / "mixtral"
    _save_moe(out)
    return out


def _save_moe(out: Path) -> None:
    from bergson_ray.defaults.tiny import load_tiny_tokenizer

    tok = load_tiny_tokenizer()
    tiny_moe("mixtral", vocab=len(tok), max_pos=2048, eager=False).save_pretrained(out)
    tok.save_pretrained(out)


def _in_process_rows(model_dir, dataset: str, split: str, n: int, token_batch_size: int):
    from bergson_ray.runners.gradient_runner import GradientRunner, RunnerSpec

    spec = RunnerSpec(
        ModelConfig(model=str(model_dir)),
        GradientConfig(projection_dim=4, moe_experts=GLOB),
        DataConfig(dataset=dataset, split=split, truncation=True),
        BatchConfig(token_batch_size=token_batch_size),
    )
    runner = GradientRunner(spec)
    return runner.engine.grad_sizes, runner.gradients(np.arange(n))["grads"]


@pytest.mark.ray
def test_build_with_moe_experts_end_to_end(
    ray_session, tmp_path, moe_model_dir, monkeypatch, caplog
):
    from bergson_ray.cli.build import config_from_args
    from bergson_ray.cli.main import make_parser
    from bergson_ray.pipelines.build import build
    from bergson_ray.store.gradient_store import GradientStore

    argv = ["build", str(tmp_path / "idx"), "--model", str(moe_model_dir), "--dataset", "tiny",
            "--split", "train[:6]", "--truncation", "--projection_dim", "4", "--num_workers", "1",
            "--token_batch_size", "512", "--moe_experts", GLOB]  # fmt: skip
    cfg = config_from_args(make_parser().parse_args(argv))
    assert cfg.grad.moe_experts == GLOB
    monkeypatch.setattr(modules_mod, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="bergson_ray.gradients.modules"):
        run = build(cfg)
    assert "gradients cover 98." in caplog.text and "WARNING" not in caplog.text

    store = GradientStore.open(run)
    assert len(store.grad_sizes) == 24 and all(v == 16 for v in store.grad_sizes.values())
    assert "layers.0.mlp.experts.expert_2.gate_up_proj" in store.grad_sizes
    recorded = yaml.safe_load((Path(run) / "config.yaml").read_text())
    assert GLOB in yaml.safe_dump(recorded)
    sizes, want = _in_process_rows(moe_model_dir, "tiny", "train[:6]", 6, 512)
    assert list(sizes) == list(store.grad_sizes)
    assert_same(rows_of(run), want)


# ------------------------------------------------------- interop with bergson 2.5.1

PYDOC = anchor.DATA / "pydoc"
needs_pydoc = pytest.mark.skipif(
    not (anchor.INSTALLED and PYDOC.exists()),
    reason=f"bergson anchor venv/data not under {anchor.ROOT}",
)


@needs_pydoc
def test_bergson_builds_the_same_rows_with_moe_experts():
    """bergson's ``build --moe_experts`` on the same model: same module keys, same rows.

    Its run is cached under the anchor's ``interop-runs`` (about a minute the first time).
    """
    root = anchor.RUNS / "moe_mixtral_v1"
    model_dir, run = root / "model", root / "build"
    if not (model_dir / "model.safetensors").exists():
        _save_moe(model_dir)
    if not (run / "info.json").exists():
        cmd = ["bergson", "build", run, "--model", model_dir, "--dataset", PYDOC,
               "--split", "train[:6]", "--projection_dim", "4", "--truncation",
               "--token_batch_size", "512", "--moe_experts", GLOB, "--overwrite", "true"]  # fmt: skip
        proc = anchor.run(cmd, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    from bergson_ray.store.gradient_store import GradientStore

    theirs = GradientStore.open(run)
    sizes, ours = _in_process_rows(model_dir, str(PYDOC), "train[:6]", 6, 512)
    assert list(sizes) == list(theirs.grad_sizes)
    assert_same(ours, rows_of(run))


# ------------------------------------------------ Hessian factors: routed-position counts


def _dense_expert_factors(model, batch, mask) -> dict[str, tuple]:
    """Expert projection -> ``(Σ a aᵀ, Σ g gᵀ, count)`` over the positions that are
    collected and routed to that expert, by autograd through transformers' own fused
    forward (empirical Fisher, summed over documents)."""
    from bergson_ray.hessians.fisher import fisher_loss

    seen: dict[int, tuple] = {}

    def keep(i):
        def hook(_mod, args, out):
            out.retain_grad()
            seen[i] = (args[0].detach(), args[1], args[2].detach(), out)

        return hook

    layers = model.model.layers
    hooks = [layer.mlp.experts.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    logits = model(batch.input_ids).logits
    fisher_loss(logits, batch.labels, batch.lengths, use_dataset_labels=True).backward()
    for h in hooks:
        h.remove()
    out = {}
    for i, (x, index, weights, y) in seen.items():
        experts = layers[i].mlp.experts
        for e in range(experts.num_experts):
            hit = index == e
            routed = hit.any(-1) & mask.reshape(-1)
            a = x[routed]
            gu = (a @ experts.gate_up_proj[e].detach().T).requires_grad_(True)
            gate, up = gu.chunk(2, dim=-1)
            h = experts.act_fn(gate) * up
            h.retain_grad()
            g_out = y.grad[routed] * (weights * hit).sum(-1)[routed, None]  # d loss / d down(h)
            (h @ experts.down_proj[e].detach().T * g_out).sum().backward()
            key = f"layers.{i}.mlp.experts.expert_{e}"
            n = int(routed.sum())
            out[f"{key}.gate_up_proj"] = (a.T @ a, gu.grad.T @ gu.grad, n)
            hd = h.detach()
            out[f"{key}.down_proj"] = (hd.T @ hd, g_out.T @ g_out, n)
    return out


def _shard_results(model, batches, shards: int):
    """Fit KFAC with one fitter (a "worker") per batch, merged into ``shards`` shard states."""
    from bergson_ray.config import HessianConfig
    from bergson_ray.hessians.fitter import FactorFitter
    from bergson_ray.hessians.shard_state import ShardState

    gcfg = GradientConfig(moe_experts=GLOB)
    hcfg = HessianConfig(method="kfac", use_dataset_labels=True, hessian_dtype="fp64")
    states = []
    for b in batches:
        fitter = FactorFitter(copy.deepcopy(model), gcfg, hcfg)
        fitter.accumulate(b.input_ids, b.labels, b.lengths, torch.arange(len(b.lengths)))
        states.append(fitter.state_dicts())
    names = list(fitter.specs)
    owners = [names[s::shards] for s in range(shards)]
    out = []
    for group in owners:
        shard = ShardState({n: fitter.specs[n] for n in group}, hcfg)
        for k, st in enumerate(states):
            shard.merge(f"w{k}", {n: st[n] for n in group})
        factors = {n: shard.acc[n].finalize() for n in group}
        shard.finalize(num_documents=sum(len(b.lengths) for b in batches))
        out.append((shard, factors))
    return out


def test_expert_factors_divide_by_the_positions_routed_to_the_expert(monkeypatch):
    """bergson 2.5.1's convention: an expert's ``A``/``S`` are means over its routed
    positions; every other module's over all collected positions. Counted once per
    position whether the documents come as one batch on one shard or two on two."""
    from bergson_ray.gradients.losses import collection_mask
    from bergson_ray.hessians import fitter

    # The reference's loss reads whole logits; so does the fit here, to compare factors
    # to 1e-12 (the chunked head's loss equals it to fp32 rounding: test_head_loss.py).
    monkeypatch.setattr(fitter, "head_split", lambda model: None)

    model = tiny_moe("mixtral").double()
    docs = random_docs([9, 2, 6, 4])
    batch = pad_batch(docs)
    mask = collection_mask(batch.lengths, batch.input_ids.shape[1])
    dense = _dense_expert_factors(copy.deepcopy(model), batch, mask)
    total = int(mask.sum())
    assert len(dense) == 16 and all(0 < n < total for *_, n in dense.values())

    one = _shard_results(model, [batch], shards=1)
    two = _shard_results(model, [pad_batch(docs[:2]), pad_batch(docs[2:])], shards=2)
    for results in (one, two):
        for shard, factors in results:
            for name, f in factors.items():
                assert shard.counts()[name] == total  # what the driver checks, all positions
                if name not in dense:  # attention: all collected positions
                    assert f.count == total, name
                    continue
                A, S, n = dense[name]
                assert f.count == n, name
                torch.testing.assert_close(f.A, A, rtol=1e-6, atol=1e-9)
                torch.testing.assert_close(f.S, S, rtol=1e-6, atol=1e-12 * S.abs().max())
                # the eigenvalue grid: (n / D) eig(S/n) eig(A/n)ᵀ
                kf = shard.results[name]
                lam_a = torch.linalg.eigvalsh(A / n)
                lam_g = torch.linalg.eigvalsh(S / n)
                want = torch.outer(lam_g, lam_a) * n / len(docs)
                torch.testing.assert_close(kf.eigenvalues, want, rtol=1e-6, atol=1e-9 * want.max())
    merged_one = {n: sh.results[n] for sh, fs in one for n in fs}
    merged_two = {n: sh.results[n] for sh, fs in two for n in fs}
    assert merged_one.keys() == merged_two.keys()
    for name in merged_one:
        for field in ("eigenvalues", "factor_eig_a", "factor_eig_g", "A", "S"):
            torch.testing.assert_close(
                getattr(merged_one[name], field), getattr(merged_two[name], field),
                rtol=1e-9, atol=1e-12,
            )  # fmt: skip


@needs_pydoc
def test_bergson_fits_the_same_expert_factors(tmp_path):
    """bergson's ``hessian --moe_experts`` (KFAC + EK-FAC, dataset labels) and ours on the
    same tiny Mixtral: same sums, and the same per-expert divisors in the eigenvalue grids.
    Its run is cached next to the build run above."""
    from helpers import rel

    from bergson_ray.hessians.factored_io import read_factored
    from bergson_ray.pipelines.hessian import hessian

    root = anchor.RUNS / "moe_mixtral_v1"
    model_dir, run = root / "model", root / "hessian_kfac_ev"
    if not (model_dir / "model.safetensors").exists():
        _save_moe(model_dir)
    flags = ["--split", "train[:6]", "--truncation", "--token_batch_size", "512",
             "--moe_experts", GLOB]  # fmt: skip
    if not (run / "eigenvalue_correction_sharded").exists():
        cmd = ["bergson", "hessian", run, "--method", "kfac", "--ev_correction", "true",
               "--use_dataset_labels", "true", "--model", model_dir, "--dataset", PYDOC,
               *flags, "--overwrite", "true"]  # fmt: skip
        proc = anchor.run(cmd, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ours = hessian(
        run_path=str(tmp_path / "ours"), model=str(model_dir), dataset=str(PYDOC),
        split="train[:6]", truncation=True, token_batch_size=512, moe_experts=GLOB,
        method="kfac", ev_correction=True, use_dataset_labels=True, num_shards=2,
        executor="process",
    )  # fmt: skip
    theirs, mine = read_factored(run, with_factors=True), read_factored(ours, with_factors=True)
    assert list(mine) == list(theirs)
    assert sum(".expert_" in m for m in mine) == 16
    for m in mine:
        for f in ("A", "S", "eigenvalues", "factor_eig_a", "factor_eig_g"):
            assert rel(getattr(mine[m], f), getattr(theirs[m], f)) < 1e-4, (m, f)
        assert rel(mine[m].correction, theirs[m].correction) < 1e-3, m
