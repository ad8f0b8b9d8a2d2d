"""In-process query path on a real (tiny) store: query gradients, Attributor, trace, CLI.

No Ray: the store is written by ``bergson_ray.query.testing.tiny_store``, which runs the
build's own GradientRunner in this process.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from bergson_ray.config import FaissConfig
from bergson_ray.errors import BadInputError, StoreError
from bergson_ray.query.attributor import Attributor
from bergson_ray.query.testing import tiny_store
from bergson_ray.query.transform import unit_normalize

N_DOCS = 48


@pytest.fixture(scope="session")
def tiny_store_path(tmp_path_factory):
    """One tiny store per session (other query test modules build the same path)."""
    return tiny_store(tmp_path_factory.getbasetemp() / "query-tiny48", n_docs=N_DOCS)


@pytest.fixture()
def store(tiny_store_path, tmp_path):
    """A private copy, so saved indexes of one test never meet another's."""
    dst = tmp_path / "store"
    shutil.copytree(tiny_store_path, dst, ignore=shutil.ignore_patterns("faiss_*"))
    return dst


@pytest.fixture(scope="module")
def attr(tiny_store_path, tmp_path_factory):
    dst = tmp_path_factory.mktemp("attr") / "store"
    shutil.copytree(tiny_store_path, dst)
    return Attributor(dst)


def corpus_texts(attr, idx):
    return attr.docs.texts(np.asarray(idx))


def test_query_gradients_are_made_exactly_like_store_rows(attr):
    idx = [0, 7, 31]
    grads = attr.gradients(corpus_texts(attr, idx))
    # Same engine, same text: equal up to float noise from a different batch packing.
    np.testing.assert_allclose(grads, attr.spec.store.rows(idx).numpy(), rtol=1e-4, atol=1e-5)


def test_text_query_top_k_equals_brute_force_over_store(attr):
    texts = ["The assert statement checks a condition", "Assignment binds names to objects"]
    res = attr.query(texts, k=8)
    rows = attr.spec.store.rows(slice(None)).numpy().astype(np.float64)
    scores = attr.gradients(texts).astype(np.float64) @ rows.T
    for r, s in zip(res, scores):
        want = np.argsort(-s, kind="stable")[:8]
        assert r.ids == want.tolist()
        np.testing.assert_allclose(r.scores, s[want], rtol=1e-4)
        assert r.texts == corpus_texts(attr, want)
        assert r.query in texts and r.direction == "top"


def test_bottom_k_and_pairs(attr):
    bottom = attr.query(["The assert statement"], k=4, reverse=True)[0]
    assert bottom.direction == "bottom" and bottom.scores == sorted(bottom.scores)
    pair = attr.query([("What does assert do?", "It raises AssertionError when false.")], k=3)[0]
    assert len(pair.ids) == 3 and "->" in pair.query


def test_self_retrieval_with_cosine(store):
    attr = Attributor(store, unit_norm=True)
    texts = corpus_texts(attr, [3, 11, 20])
    res = attr.query(texts, k=1)
    assert [r.ids[0] for r in res] == [3, 11, 20]
    np.testing.assert_allclose([r.scores[0] for r in res], 1.0, atol=1e-5)


def write_dense_hessians(store_path, out_dir):
    from bergson_ray.store.gradient_store import GradientStore
    from bergson_ray.store.processor import save_hessians

    st = GradientStore.open(store_path)
    rows = st.rows(slice(None)).double()
    hess, start = {}, 0
    for name, size in st.grad_sizes.items():
        block = rows[:, start : start + size]
        hess[name] = (block.T @ block / len(block)).float()
        start += size
    save_hessians(out_dir, hess)
    return out_dir


def block_power(store_path, power, damping=0.1):
    from bergson_ray.store.gradient_store import GradientStore

    st = GradientStore.open(store_path)
    rows = st.rows(slice(None)).double().numpy()
    dim = rows.shape[1]
    out = np.zeros((dim, dim))
    start = 0
    for size in st.grad_sizes.values():
        b = rows[:, start : start + size]
        lam, q = np.linalg.eigh(b.T @ b / len(b))
        lam = np.clip(lam, 0, None)
        m = 1 / (lam + damping * lam.mean())
        m = np.sqrt(m) if power == -0.5 else m
        out[start : start + size, start : start + size] = (q * m) @ q.T
        start += size
    return out


@pytest.mark.parametrize("unit_norm", [False, True])
@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_preconditioned_store_search_matches_brute_force(store, tmp_path, unit_norm, factory):
    hdir = write_dense_hessians(store, tmp_path / "hess")
    attr = Attributor(
        store, index_factory=factory, nprobe=4, unit_norm=unit_norm, hessian_path=str(hdir)
    )
    texts = ["The assert statement checks a condition"]
    q = attr.gradients(texts).astype(np.float64)
    rows = attr.spec.store.rows(slice(None)).numpy().astype(np.float64)
    if unit_norm:  # H^-1/2 both sides, then normalise
        hm = block_power(store, -0.5)
        qs = unit_normalize((q @ hm).astype(np.float32)).astype(np.float64)
        rs = unit_normalize((rows @ hm).astype(np.float32)).astype(np.float64)
        scores = qs @ rs.T
    else:  # H^-1 on the query only
        scores = (q @ block_power(store, -1.0)) @ rows.T
    want = np.argsort(-scores[0])[:6]
    got = attr.query(texts, k=6)[0]
    assert got.ids == want.tolist()  # nprobe = nlist: IVF is exhaustive here
    np.testing.assert_allclose(got.scores, scores[0][want], rtol=2e-3, atol=1e-4)
    assert (
        store / f"faiss_{factory.replace(',', '_')}{'_cosine' if unit_norm else ''}_precondition"
    ).is_dir()


def test_store_preconditioned_at_build_is_not_preconditioned_twice(store, tmp_path):
    hdir = write_dense_hessians(store, tmp_path / "hess")
    with pytest.raises(BadInputError, match="already preconditioned"):
        from bergson_ray.query.transform import BuildPreprocess, make_transforms

        make_transforms(
            FaissConfig(hessian_path=str(hdir)),
            {"a": 1},
            BuildPreprocess(hessian_path=str(hdir)),
        )


def test_trace_matches_query(attr):
    from bergson_ray.runners.model_loading import load_model

    model, tok = load_model(attr.spec.build.model)
    for p in model.parameters():
        p.requires_grad_(True)
    texts = corpus_texts(attr, [5])
    want = attr.query(texts, k=5)[0]
    ids = torch.tensor([tok(texts[0])["input_ids"]])
    with attr.trace(model, k=5) as hits:
        model(ids, labels=ids).loss.backward()
    # HF's loss is a mean over tokens; the store's is a sum: same ranking, scaled scores.
    assert hits.indices[0].tolist() == want.ids
    ratio = hits.scores[0].numpy() / np.asarray(want.scores)
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-3)


def test_bad_inputs(attr):
    with pytest.raises(BadInputError, match="empty"):
        attr.query([""], k=3)
    with pytest.raises(BadInputError, match="at least one"):
        attr.query([], k=3)
    with pytest.raises(BadInputError, match="k must be >= 1"):
        attr.query(["The assert statement"], k=0)
    with pytest.raises(BadInputError, match="larger than the number of rows"):
        attr.query(["The assert statement"], k=N_DOCS + 1)
    with pytest.raises(BadInputError, match=f"dim 3 but the index's rows have dim {attr.dim}"):
        attr.query_gradients(np.ones((1, 3)), k=3)
    with pytest.raises(StoreError, match="does not exist"):
        Attributor("/nonexistent/store")


def test_cli_query_json_and_csv(store, capsys):
    from bergson_ray.cli.main import main

    rc = main(
        [
            "--log_level",
            "WARNING",
            "query",
            "--index",
            str(store),
            "--query",
            "The assert statement",
            "--k",
            "3",
            "--format",
            "json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    want = Attributor(store).query(["The assert statement"], k=3)[0]
    assert out[0]["ids"] == want.ids
    rc = main(
        [
            "--log_level",
            "WARNING",
            "query",
            "--index",
            str(store),
            "--query",
            "The assert statement",
            "--k",
            "2",
            "--bottom_k",
            "1",
            "--format",
            "csv",
        ]
    )
    lines = capsys.readouterr().out
    assert lines.startswith("query,direction,result,result_index,score")
    assert ",bottom," in lines
    assert main(["query", "--index", str(store), "--query", " ", "--k", "2"]) == 2
    assert "empty" in capsys.readouterr().err


def test_cli_query_prompt_reads_queries_until_eof(store, capsys, monkeypatch):
    import io

    from bergson_ray.cli.main import main

    monkeypatch.setattr(
        "sys.stdin", io.StringIO("The assert statement\nx\nAssignment binds names\n")
    )
    rc = main(["--log_level", "WARNING", "query", "--index", str(store), "--k", "2"])
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.out.count("== top 2 for:") == 2  # the 1-token query "x" is refused...
    assert "too short" in captured.err  # ...with a message, and the prompt goes on


def test_per_token_rows_map_to_their_documents():
    from bergson_ray.query.documents import DocumentLookup

    lookup = DocumentLookup.__new__(DocumentLookup)  # only the offsets matter here
    lookup.offsets = np.array([0, 3, 3, 7])  # doc 1 has no token rows
    assert lookup.doc_ids(np.array([0, 2, 3, 6, -1])).tolist() == [0, 0, 2, 2, -1]
