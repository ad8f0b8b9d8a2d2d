"""The query service on the session's Ray cluster: shards, merge, restarts, bad input, HTTP.

Every service started here is stopped in teardown (detached actors outlive drivers).
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest

from bergson_ray.errors import BadInputError
from bergson_ray.query.attributor import Attributor
from bergson_ray.query.testing import tiny_store
from bergson_ray.utils.net import free_port

pytestmark = pytest.mark.ray

NS = "bergson_ray_tests"
N_DOCS = 48
TEXTS = ["The assert statement checks a condition", "Assignment binds names to objects"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    base = tiny_store(tmp_path_factory.getbasetemp() / "query-tiny48", n_docs=N_DOCS)
    dst = tmp_path_factory.mktemp("svc") / "store"
    shutil.copytree(base, dst, ignore=shutil.ignore_patterns("faiss_*"))
    return dst


@pytest.fixture(scope="module")
def services(ray_session):
    """Start services through this; all are stopped at module end."""
    from bergson_ray.pipelines.serve import serve, stop

    started: list[str] = []

    def start(**kw):
        kw.setdefault("namespace", NS)
        info = serve(**kw)
        started.append(info["name"])
        return info

    yield start
    for name in started:
        try:
            stop(name, NS)
        except BadInputError:
            pass


@pytest.fixture(scope="module")
def three(services, store):
    services(store=str(store), name="svc3", num_shards=3, max_batch_size=8)
    from bergson_ray.query.client import connect

    return connect(name="svc3", namespace=NS)


@pytest.fixture(scope="module")
def local(store):
    return Attributor(store, num_shards=3)


def test_service_equals_in_process_attributor(three, local):
    got = three.query(TEXTS, k=6)
    want = local.query(TEXTS, k=6)
    for g, w in zip(got, want):
        assert g.ids == w.ids and g.texts == w.texts and g.query == w.query
        np.testing.assert_allclose(g.scores, w.scores, rtol=1e-5)
    grads = local.gradients(TEXTS)
    np.testing.assert_allclose(three.gradients(TEXTS), grads, rtol=1e-4, atol=1e-5)
    by_grad = three.query_gradients(grads, k=6)
    assert [r.ids for r in by_grad] == [w.ids for w in want]
    bottom = three.query(TEXTS, k=4, reverse=True)
    assert [b.ids for b in bottom] == [r.ids for r in local.query(TEXTS, k=4, reverse=True)]


def test_one_and_three_shards_give_identical_flat_results(services, store, three):
    from bergson_ray.query.client import connect

    services(store=str(store), name="svc1", num_shards=1)
    one = connect(name="svc1", namespace=NS)
    grads = Attributor(store, save=False).gradients(TEXTS + ["for loops iterate over items"])
    for reverse in (False, True):
        a = one.query_gradients(grads, k=10, reverse=reverse)
        b = three.query_gradients(grads, k=10, reverse=reverse)
        assert [r.ids for r in a] == [r.ids for r in b]
        np.testing.assert_allclose([r.scores for r in a], [r.scores for r in b], rtol=1e-6)
    from bergson_ray.pipelines.serve import stop

    stop("svc1", NS)


def test_concurrent_text_queries_are_batched(three):
    import ray

    before = three.info()
    refs = [three.handle.query.remote([t], 3, False) for t in TEXTS * 4]
    out = ray.get(refs, timeout=120)
    after = three.info()
    assert all(len(r[0].ids) == 3 for r in out)
    assert after["model_batches"] - before["model_batches"] < len(refs)


def test_killed_index_shard_restarts_from_saved_index(three, local):
    import ray

    info = three.info()
    victim = info["shards"][1]
    ray.kill(ray.get_actor("svc3::shard-1", namespace=NS), no_restart=False)
    grads = local.gradients(TEXTS)
    res = three.query_gradients(grads, k=5)  # waits for the restart, then succeeds
    assert [r.ids for r in res] == [r.ids for r in local.query_gradients(grads, k=5)]
    again = three.info()["shards"][1]
    assert again["pid"] != victim["pid"]
    assert again["loaded_from_disk"] is True


def test_killed_query_actor_restarts(three):
    import ray

    pid = three.info()["pid"]
    ray.kill(ray.get_actor("svc3", namespace=NS), no_restart=False)
    assert len(three.query(TEXTS[:1], k=2)[0].ids) == 2
    assert three.info()["pid"] != pid


def test_bad_input_gets_clear_errors_and_the_service_keeps_serving(three):
    from bergson_ray.query.client import connect

    cases = [
        (lambda: three.query([""], k=3), "empty"),
        (lambda: three.query(TEXTS, k=0), "k must be >= 1"),
        (lambda: three.query(TEXTS, k=N_DOCS + 1), "larger than the number of rows"),
        (lambda: three.query_gradients(np.ones((1, 7)), k=3), "dim 7 but the index's rows"),
        (lambda: three.query_gradients(np.full((1, 4096), np.nan), k=3), "NaN"),
        (lambda: three.query([42], k=3), "expected text"),
        (lambda: connect(name="no-such-service", namespace=NS), "no query service named"),
    ]
    for call, msg in cases:
        with pytest.raises(BadInputError, match=msg):
            call()
    other = connect(name="svc3", namespace=NS)  # another client, same service
    assert len(other.query(TEXTS, k=2)) == 2


def test_serve_refuses_duplicates_and_bad_settings(services, store, three):
    with pytest.raises(BadInputError, match="already running"):
        services(store=str(store), name="svc3")
    with pytest.raises(BadInputError, match="invalid FAISS index_factory"):
        services(store=str(store), name="svcbad", index_factory="Nope")
    with pytest.raises(BadInputError, match="cannot split"):
        services(store=str(store), name="svcbad", num_shards=N_DOCS + 1)
    from bergson_ray.pipelines.serve import list_services

    assert "svcbad" not in [s["name"] for s in list_services(NS)]


def _post(url, body, token):
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_http_endpoint_checks_the_bearer_token(services, store, local):
    pytest.importorskip("ray.serve")
    pytest.importorskip("fastapi")
    from ray import serve as rserve

    port = free_port()
    info = services(
        store=str(store), name="svchttp", http=True, http_port=port, http_token="s3cret-token"
    )
    try:
        url = info["http"]["url"]
        assert url == f"http://127.0.0.1:{port}/svchttp"
        status, body = _post(f"{url}/query", {"queries": TEXTS, "k": 4}, "s3cret-token")
        assert status == 200
        assert [r["ids"] for r in body["results"]] == [r.ids for r in local.query(TEXTS, k=4)]
        assert _post(f"{url}/query", {"queries": TEXTS, "k": 4}, "wrong")[0] == 401
        assert _post(f"{url}/query", {"queries": TEXTS, "k": 4}, None)[0] == 401
        status, body = _post(f"{url}/query", {"queries": [""], "k": 4}, "s3cret-token")
        assert status == 400 and "empty" in body["error"]
        grads = local.gradients(TEXTS[:1]).tolist()
        status, body = _post(f"{url}/query_gradients", {"gradients": grads, "k": 2}, "s3cret-token")
        assert status == 200 and len(body["results"][0]["ids"]) == 2
    finally:
        from bergson_ray.pipelines.serve import stop

        stop("svchttp", NS)
        rserve.shutdown()


def test_http_without_ray_serve_fails_before_anything_starts(monkeypatch):
    """Without the ``serve`` extra, ``serve --http`` says so before a single actor starts
    (it used to leave the index and query actors of a failed command running)."""
    import importlib.util

    from bergson_ray.errors import BadInputError
    from bergson_ray.pipelines import serve as serve_pipeline

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray.serve" else real(name, *a)
    )
    started = []
    monkeypatch.setattr(serve_pipeline, "connect_cluster", lambda *a, **k: started.append(a))
    monkeypatch.setattr(serve_pipeline, "validate", lambda cfg: None)
    with pytest.raises(BadInputError, match=r"--http needs Ray Serve"):
        serve_pipeline.serve(store="/tmp/anything", http=True)
    assert started == []
