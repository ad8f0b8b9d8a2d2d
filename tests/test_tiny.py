"""The embedded tiny default: contents, determinism, caching, locking, training."""

from __future__ import annotations

import threading
import time

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXForCausalLM

from bergson_ray.defaults import pydoc_corpus, tiny_build
from bergson_ray.defaults import tiny as tiny_module
from bergson_ray.defaults.tiny import (
    ensure_tiny_assets,
    load_tiny_tokenizer,
    make_long_corpus,
    resolve_dataset,
    resolve_model_path,
)


def test_assets_contents(tiny_assets):
    tok = load_tiny_tokenizer(tiny_assets)
    assert len(tok) == tiny_build.VOCAB_SIZE
    assert tok.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|padding|>"]
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1
    assert tok.chat_template

    model = AutoModelForCausalLM.from_pretrained(str(tiny_assets.model_dir))
    assert isinstance(model, GPTNeoXForCausalLM)
    assert model.config.vocab_size == len(tok)
    assert not model.config.tie_word_embeddings
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 10_000_000

    corpus = datasets.load_from_disk(str(tiny_assets.corpus_dir))
    assert corpus.column_names == ["text"] and len(corpus) > 1000
    texts = list(corpus["text"])
    assert min(len(t) for t in texts) >= pydoc_corpus.MIN_PARAGRAPH_CHARS
    assert len(set(texts)) == len(corpus)  # one source row per query

    query = datasets.load_from_disk(str(tiny_assets.query_dir))
    assert len(query) == tiny_build.N_QUERY
    for text, src in zip(query["text"], query["src_idx"]):
        assert corpus[src]["text"] == text


def test_optimizer_state_matches_parameters(tiny_assets):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_assets.model_dir))
    moments = load_file(str(tiny_assets.model_dir / "optimizer_state.safetensors"))
    params = dict(model.named_parameters())
    assert set(moments) == {f"{n}.exp_avg_sq" for n in params}
    for name, p in params.items():
        v = moments[f"{name}.exp_avg_sq"]
        assert v.shape == p.shape and v.dtype == torch.float32
        assert torch.all(v >= 0)
    assert any(torch.count_nonzero(v) > 0 for v in moments.values())


def _corpus_loss(model, texts, tok) -> float:
    losses = []
    with torch.inference_mode():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    return sum(losses) / len(losses)


def test_trained_model_beats_random_init(tiny_assets):
    tok = load_tiny_tokenizer(tiny_assets)
    texts = list(datasets.load_from_disk(str(tiny_assets.corpus_dir))["text"])[::100][:12]
    trained = AutoModelForCausalLM.from_pretrained(str(tiny_assets.model_dir)).eval()
    torch.manual_seed(123)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_assets.model_dir))
    trained_loss = _corpus_loss(trained, texts, tok)
    fresh_loss = _corpus_loss(fresh.eval(), texts, tok)
    assert trained_loss < fresh_loss - 1.0, (trained_loss, fresh_loss)


def test_cached_second_call_is_fast(tiny_assets):
    t0 = time.perf_counter()
    again = ensure_tiny_assets()
    assert time.perf_counter() - t0 < 0.5
    assert again == tiny_assets


def test_resolve_names(tiny_assets):
    assert resolve_model_path("tiny") == str(tiny_assets.model_dir)
    assert resolve_dataset("tiny") == str(tiny_assets.corpus_dir)
    assert resolve_model_path("EleutherAI/pythia-14m") == "EleutherAI/pythia-14m"
    assert resolve_dataset("/data/x.jsonl") == "/data/x.jsonl"


def test_build_is_deterministic(tmp_path):
    a = ensure_tiny_assets(tmp_path / "a", train_steps=3)
    b = ensure_tiny_assets(tmp_path / "b", train_steps=3)
    assert a.root != b.root
    assert load_tiny_tokenizer(a).get_vocab() == load_tiny_tokenizer(b).get_vocab()
    for fname in ("model.safetensors", "optimizer_state.safetensors"):
        wa, wb = load_file(str(a.model_dir / fname)), load_file(str(b.model_dir / fname))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for d in ("corpus_dir", "query_dir"):
        da = datasets.load_from_disk(str(getattr(a, d)))
        db = datasets.load_from_disk(str(getattr(b, d)))
        assert da.to_dict() == db.to_dict()
    assert a.manifest["train"]["steps"] == 3


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls = []
    real_build = tiny_build.build_tiny

    def counting_build(root, steps):
        calls.append(root)
        time.sleep(0.3)  # widen the race window
        real_build(root, steps)

    monkeypatch.setattr(tiny_module, "build_tiny", counting_build)
    results, errors = [], []

    def worker():
        try:
            results.append(ensure_tiny_assets(tmp_path, train_steps=1))
        except Exception as exc:  # pragma: no cover - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    assert len({r.root for r in results}) == 1
    assert (results[0].root / "manifest.json").exists()
    assert not list(tmp_path.glob(".*.tmp-*")), "no temp build dirs left behind"


def test_make_long_corpus_exact_lengths(tiny_assets):
    ds = make_long_corpus(n_docs=24, n_tokens=64)
    tok = load_tiny_tokenizer(tiny_assets)
    assert len(ds) == 24
    texts = list(ds["text"])
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    assert lengths == [64] * 24
    assert len(set(texts)) == 24
    again = make_long_corpus(n_docs=24, n_tokens=64)
    assert list(again["text"]) == texts


def test_long_corpus_rejects_bad_sizes():
    with pytest.raises(ValueError):
        make_long_corpus(n_docs=0)
