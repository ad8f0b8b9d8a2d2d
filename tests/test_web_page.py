"""The query service's web page in a real browser (headless Chromium through Playwright).

A tiny per-token store (``--attribute_tokens``) is served over HTTP. The page must show
exactly what the API answers (ids and scores), show document text literally (a ``<b>``
in a document stays text), refuse a wrong token plainly while the API answers 401, and
draw the per-token heat map whose hit cells carry the hits' scores. The browser tests
skip where Chromium, Playwright or Ray Serve is missing (CI installs them: ``.ci/run``
and the ``dev``/``serve`` extras); the heat map's arithmetic is checked without them.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bergson_ray.errors import BadInputError
from bergson_ray.utils.net import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

NS = "bergson_ray_web"
NAME = "webtokens"
TOKEN = "page-test-token"
HTML_DOC = "Markup stays text: <b>bold</b> & <i>x</i> <script>alert(1)</script> in a docstring."
QUERY = "The assert statement checks a condition"
ARTIFACTS = Path(__file__).parent / "artifacts"
N_CORPUS = 7


def _missing() -> str:
    """Why the browser tests cannot run here ('' when they can)."""
    import importlib.util

    if CHROMIUM is None:
        return "no chromium on PATH (apt-get install chromium)"
    for mod, extra in (("playwright", "dev"), ("ray.serve", "serve"), ("fastapi", "serve")):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install -e '.[{extra}]')"
    return ""


# a mark, not a skip in a fixture: it is decided before the session's Ray starts
needs_browser = pytest.mark.skipif(bool(_missing()), reason=f"browser test: {_missing()}")


def _store(path: Path, texts: list[str], *, per_token: bool) -> Path:
    """A store over ``texts`` made by the build's own runner (text kept in ``data.hf``)."""
    import datasets

    from bergson_ray.config import BuildConfig, DataConfig, GradientConfig, RunConfig
    from bergson_ray.runners.gradient_runner import GradientRunner, RunnerSpec
    from bergson_ray.store.gradient_writer import GradientStoreWriter
    from bergson_ray.store.processor import ProcessorConfig, save_processor
    from bergson_ray.store.run_dir import RunDir

    corpus = path.with_name(path.name + "-corpus")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(corpus))
    cfg = BuildConfig(
        run=RunConfig(run_path=str(path)),
        data=DataConfig(dataset=str(corpus)),
        grad=GradientConfig(projection_dim=8, attribute_tokens=per_token),
        drop_columns=False,
    )
    runner = GradientRunner(
        RunnerSpec(model=cfg.model, grad=cfg.grad, data=cfg.data, batch=cfg.batch,
                   preprocess=cfg.preprocess)
    )  # fmt: skip
    out = runner.gradients(np.arange(len(texts)))
    run = RunDir(path, overwrite=True)
    part = Path(run.part)
    kw: dict = {}
    if per_token:
        counts = out["token_count"]
        kw = dict(attribute_tokens=True, offsets=np.concatenate([[0], np.cumsum(counts)]))
    with GradientStoreWriter(
        part, num_items=len(texts), grad_sizes=runner.engine.grad_sizes, dtype="float32", **kw
    ) as w:
        if per_token:
            w.write_items(out["idx"], np.concatenate(list(out["grads"])), counts)
        else:
            w.write_rows(out["idx"], out["grads"])
    run.write_config(cfg)
    datasets.load_from_disk(str(corpus)).save_to_disk(str(part / "data.hf"))
    save_processor(part, ProcessorConfig.from_gradient_config(cfg.grad))
    run.commit()
    return path


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    """``(url, store path)`` of a per-token store served over HTTP (one service: each
    costs a model and a Ray Serve replica, too much for a 2-core CI machine twice)."""
    import datasets
    from ray import serve as rserve

    from bergson_ray.defaults.tiny import ensure_tiny_assets
    from bergson_ray.pipelines.serve import serve, stop

    corpus = datasets.load_from_disk(str(ensure_tiny_assets().corpus_dir))
    texts = [*corpus.select(range(N_CORPUS))["text"], HTML_DOC]
    store = _store(tmp_path_factory.mktemp("web") / "store", texts, per_token=True)
    try:
        info = serve(store=str(store), name=NAME, namespace=NS, http=True,
                     http_port=free_port(), http_token=TOKEN)  # fmt: skip
        yield info["http"]["url"], store
    finally:
        try:
            stop(NAME, NS)
        except BadInputError:
            pass
        rserve.shutdown()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],  # CI containers
        )
        yield b
        b.close()


def _api(url: str, body: dict | None, token: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode())
    req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _connect(page, url: str, token: str) -> None:
    page.goto(url + "/")
    page.fill("#token", token)
    page.click("#token-form button[type=submit]")


def _search(page, text: str, k: int, direction: str = "top") -> list[dict]:
    page.fill("#query-text", text)
    page.fill("#k", str(k))
    page.select_option("#direction", direction)
    page.eval_on_selector("#results tbody", "b => b.replaceChildren()")  # no stale rows
    page.click("#submit")
    page.wait_for_function(
        "n => document.querySelectorAll('#results tbody tr').length === n "
        "&& !document.getElementById('submit').disabled",
        arg=k,
        timeout=60_000,
    )
    return page.eval_on_selector_all(
        "#results tbody tr",
        "rows => rows.map(r => ({id: +r.dataset.id, doc: +r.dataset.doc, "
        "score: +r.dataset.score, shown: r.querySelector('.score').textContent, "
        "text: r.querySelector('td:last-child').textContent, "
        "markup: r.querySelectorAll('td:last-child b, td:last-child script').length}))",
    )


@pytest.mark.ray
@needs_browser
def test_page_shows_the_apis_answer_with_text_escaped(service, browser):
    url = service[0]
    page = browser.new_page()
    _connect(page, url, TOKEN)
    page.wait_for_selector("#query-section", state="visible")
    assert page.evaluate("Object.values(sessionStorage)") == [TOKEN]
    for direction in ("top", "bottom"):
        rows = _search(page, QUERY, 8, direction)
        status, body = _api(
            f"{url}/query", {"queries": [QUERY], "k": 8, "reverse": direction == "bottom"}, TOKEN
        )
        assert status == 200 and "token_docs" not in body["results"][0]  # old API unchanged
        api = body["results"][0]
        assert [(r["id"], r["doc"]) for r in rows] == list(zip(api["ids"], api["doc_ids"]))
        assert [r["score"] for r in rows] == api["scores"]
        assert [float(r["shown"]) for r in rows] == pytest.approx(api["scores"], rel=1e-5)
    page.check('input[name="mode"][value="pair"]')  # a pasted prompt + completion
    page.fill("#query-prompt", "What does assert do?")
    page.fill("#query-completion", QUERY)
    page.select_option("#direction", "top")
    page.click("#submit")
    page.wait_for_function(
        "() => document.getElementById('results-summary').textContent.includes('->')"
    )
    pair = {"queries": [["What does assert do?", QUERY]], "k": 8}
    api = _api(f"{url}/query", pair, TOKEN)[1]["results"][0]
    shown = page.eval_on_selector_all("#results tbody tr", "rs => rs.map(r => +r.dataset.id)")
    assert shown == api["ids"] and api["query"] == f"What does assert do? -> {QUERY}"
    page.check('input[name="mode"][value="text"]')
    # the markup document: its text and its tokens are shown as text, never as markup
    rows = _search(page, HTML_DOC, 3)
    assert [r["doc"] for r in rows] == [N_CORPUS] * 3
    assert all(r["text"] == HTML_DOC and r["markup"] == 0 for r in rows)
    tokens = page.eval_on_selector_all(
        f'.heat-doc[data-doc="{N_CORPUS}"] .tok', "ts => ts.map(t => t.textContent)"
    )
    assert "<b>bold</b>" in "".join(tokens)
    assert page.locator("main b, main script, main i").count() == 0
    assert TOKEN not in page.url
    page.close()


@pytest.mark.ray
@needs_browser
def test_wrong_or_missing_token_is_refused_plainly(service, browser):
    url = service[0]
    for token in (None, "wrong"):
        assert _api(f"{url}/query", {"queries": [QUERY], "k": 2}, token)[0] == 401
        assert _api(f"{url}/info", None, token)[0] == 401
    with urllib.request.urlopen(url, timeout=30) as r:  # the page itself needs no token
        assert r.status == 200 and r.url == url + "/"  # redirected: relative links work
        assert "text/html" in r.headers["Content-Type"] and r.headers["Content-Security-Policy"]
        page_html = r.read()
    with urllib.request.urlopen(url + "/ui", timeout=30) as r:
        assert r.read() == page_html
    page = browser.new_page()
    _connect(page, url, "wrong")
    page.wait_for_selector("#message.error", state="visible")
    message = page.text_content("#message")
    assert "401" in message and "missing or wrong" in message
    assert page.locator("#query-section").is_hidden()
    assert page.evaluate("sessionStorage.length") == 0  # a refused token is not kept
    page.close()


@pytest.mark.ray
@needs_browser
def test_per_token_store_shows_the_heat_map(service, browser):
    from bergson_ray.store.gradient_store import GradientStore

    url, store = service
    offsets = GradientStore.open(store).offsets
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    _connect(page, url, TOKEN)
    page.wait_for_selector("#query-section", state="visible")
    k = 10
    rows = _search(page, QUERY, k)
    status, body = _api(f"{url}/query", {"queries": [QUERY], "k": k, "tokens": True}, TOKEN)
    api = body["results"][0]
    assert status == 200 and [r["id"] for r in rows] == api["ids"]
    page.wait_for_selector("#heat-section", state="visible")
    docs = list(dict.fromkeys(api["doc_ids"]))
    assert len(docs) > 1
    assert page.eval_on_selector_all(".heat-doc", "ds => ds.map(d => +d.dataset.doc)") == docs
    heat = {d["doc_id"]: d for d in api["token_docs"]}
    for row, doc, score in zip(api["ids"], api["doc_ids"], api["scores"]):
        d = heat[doc]
        cells = page.locator(f'.heat-doc[data-doc="{doc}"] .tok')
        assert cells.count() == len(d["tokens"])
        t = row - int(offsets[doc]) + 1 - d["start"]  # row offsets[doc] + s: token s + 1
        cell = cells.nth(t)
        assert "hit" in (cell.get_attribute("class") or "")
        assert cell.text_content() == d["tokens"][t]
        # the hit's token carries the hit's search score (a Flat index: exact)
        assert float(cell.get_attribute("data-score")) == pytest.approx(score, rel=1e-4, abs=1e-5)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_page.png"), full_page=True)
    page.close()


def test_token_heat_gives_each_token_its_rows_score(tmp_path):
    """Row ``offsets[d] + s`` colours token ``s + 1``; long documents show a window around
    their best hit; a store whose items are not whole documents gets no heat map."""
    from types import SimpleNamespace

    from bergson_ray.config import BuildConfig, DataConfig, FaissConfig
    from bergson_ray.query.results import QueryResult
    from bergson_ray.query.store_spec import StoreSpec
    from bergson_ray.query.token_heat import TokenHeat
    from bergson_ray.query.transform import BuildPreprocess, unit_normalize
    from bergson_ray.store.gradient_store import GradientStore
    from bergson_ray.store.gradient_writer import GradientStoreWriter

    counts = np.array([3, 12, 1])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(int(offsets[-1]), 4)).astype(np.float32)
    path = tmp_path / "store"
    with GradientStoreWriter(path, num_items=3, grad_sizes={"gradients": 4},
                             attribute_tokens=True, offsets=offsets) as w:  # fmt: skip
        w.write_items(np.arange(3), rows, counts)
    spec = StoreSpec(path, GradientStore.open(path), BuildConfig(), BuildPreprocess())

    def tokenize(idx):  # token ids 100*d + t: document d has counts[d] + 1 tokens
        d = int(idx[0])
        return [SimpleNamespace(input_ids=[100 * d + t for t in range(counts[d] + 1)])]

    q = rng.normal(size=(1, 4)).astype(np.float32)
    hits = QueryResult(ids=[int(offsets[1]) + 9, 1], scores=[0.0, 0.0], doc_ids=[1, 0])
    for unit in (False, True):
        heat = TokenHeat(spec, FaissConfig(unit_norm=unit), tokenize, lambda i: f"<{i}>",
                         max_tokens=6)  # fmt: skip
        expect = (unit_normalize(rows) if unit else rows) @ q[0]
        [[long, short]] = heat.documents(q, [hits])
        # document 1: 13 tokens, hit on token 10 -> the window is tokens 7..12
        assert (long["doc_id"], long["start"], long["hits"]) == (1, 7, [3])
        assert long["tokens"] == [f"<{100 + t}>" for t in range(7, 13)]
        assert long["scores"] == pytest.approx(expect[offsets[1] + 6 : offsets[1] + 12].tolist())
        # document 0: 4 tokens, all shown; token 0 has no row
        assert (short["doc_id"], short["start"], short["hits"]) == (0, 0, [2])
        assert short["scores"][0] is None
        assert short["scores"][1:] == pytest.approx(expect[0:3].tolist())
    wrong = TokenHeat(spec, FaissConfig(), lambda idx: [SimpleNamespace(input_ids=[1, 2])], str)
    assert wrong.documents(q, [hits]) == [[]]  # tokens that do not match the rows: no map
    chunked = StoreSpec(path, spec.store, BuildConfig(data=DataConfig(chunk_length=8)),
                        BuildPreprocess())  # fmt: skip
    assert TokenHeat(chunked, FaissConfig(), tokenize, str).documents(q, [hits]) == [[]]
