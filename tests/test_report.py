"""``bergson-ray report``: the page lists exactly the stored top/bottom rows, escapes text,
its PNGs are real PNGs, the LDS shown is summary.csv's, runs on one bank are compared,
an unknown directory gets one sentence, and the output appears atomically or not at all.

Fixtures are written directly with our writers (score stores with ``ScoreWriter``,
validate runs with ``validation/lds.py`` + ``validation/csv_out.py``): no Ray, no model.
"""

from __future__ import annotations

import csv
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from bergson_ray.errors import BadInputError
from bergson_ray.report import plots
from bergson_ray.report.latency import LatencyReport, measure, service_latency
from bergson_ray.report.writer import INDEX, write_report
from bergson_ray.store.score_writer import ScoreWriter
from bergson_ray.validation import csv_out
from bergson_ray.validation.lds import compute_lds
from bergson_ray.validation.subsets import save_subsets

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NASTY = "<script>alert('x')</script> & \"quotes\""


class Rows(HTMLParser):
    """``data-*`` attributes of every ``<tr>`` and the ``src`` of every ``<img>``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and any(k.startswith("data-") for k in a):
            self.rows.append({k[5:]: v for k, v in a.items() if k.startswith("data-")})
        elif tag == "img":
            self.images.append(a["src"])


def parse(report: Path) -> tuple[str, Rows]:
    text = (report / INDEX).read_text(encoding="utf-8")
    p = Rows()
    p.feed(text)
    return text, p


def write_store(path: Path, scores: np.ndarray, unwritten: tuple[int, ...] = (),
                texts: list[str] | None = None, higher_is_better: bool | None = None) -> Path:
    rows = np.array([r for r in range(len(scores)) if r not in unwritten])
    with ScoreWriter(path, len(scores), scores.shape[1]) as w:
        w.write(rows, scores[rows])
    if texts is not None:
        import datasets

        datasets.Dataset.from_dict({"text": texts, "length": [3] * len(texts)}).save_to_disk(
            str(path / "data.hf"))
    if higher_is_better is not None:
        doc = {"steps": [{"score": {"score_cfg": {"higher_is_better": higher_is_better}}}]}
        (path / "config.yaml").write_text(yaml.safe_dump(doc))
    return path


def expected_ranking(col: np.ndarray, written: np.ndarray, n: int) -> tuple[list, list]:
    ids = np.flatnonzero(written)
    top = ids[np.argsort(-col[ids], kind="stable")[:n]]
    bottom = ids[np.argsort(col[ids], kind="stable")[:n]]
    return top.tolist(), bottom.tolist()


def ranked(rows: Rows, q: int, side: str) -> list[dict[str, str]]:
    out = [r for r in rows.rows if r.get("query") == str(q) and r.get("side") == side]
    return sorted(out, key=lambda r: int(r["rank"]))


# --------------------------------------------------------------------------- scores


def test_score_report_lists_exactly_the_top_rows_and_escapes_text(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((40, 3)).astype(np.float32)
    texts = [f"doc {i}: {NASTY}" for i in range(40)]
    store = write_store(tmp_path / "run", scores, unwritten=(7,), texts=texts,
                        higher_is_better=True)
    out = write_report([store], top=5)
    assert out == store / "report"
    html, rows = parse(out)
    written = np.ones(40, bool)
    written[7] = False
    for q in range(3):
        top, bottom = expected_ranking(scores[:, q], written, 5)
        for side, want in (("top", top), ("bottom", bottom)):
            got = ranked(rows, q, side)
            assert [int(r["row"]) for r in got] == want
            assert [float(r["score"]) for r in got] == scores[want, q].tolist()
            for r in want:  # each row is shown with its own document's text, escaped
                assert f"<pre>doc {r}: &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; " \
                    "&amp; &quot;quotes&quot;</pre>" in html
    assert "<script>" not in html
    assert "highest scores help" in html


def test_pngs_exist_and_are_valid(tmp_path):
    from matplotlib.image import imread

    scores = np.random.default_rng(1).standard_normal((30, 2)).astype(np.float32)
    out = write_report([write_store(tmp_path / "run", scores)], top=3)
    _, rows = parse(out)
    assert sorted(rows.images) == ["s0_hist_q0.png", "s0_hist_q1.png"]
    for name in rows.images:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        img = imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not [p for p in tmp_path.joinpath("run").iterdir() if p.name.startswith(".")]


def test_text_from_the_enclosing_runs_dataset(tmp_path):
    """A magic-like run: ``RUN/scores`` (loss-signed) without data.hf; the text comes from
    the dataset ``RUN/config.yaml`` names. Per-token rows map to their document."""
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": f"corpus row {i} <b>"}) + "\n" for i in range(4)))
    run = tmp_path / "magic_run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"steps": [{"magic": {"data": {"dataset": str(data), "split": "train"}}}]}))
    offsets = np.array([0, 2, 5, 6, 9])
    scores = np.arange(9, dtype=np.float32)[:, None] * np.array([[1.0, -1.0]], np.float32)
    with ScoreWriter(run / "scores", 9, 2, attribute_tokens=True, offsets=offsets) as w:
        w.write(np.arange(9), scores)
    doc = {"steps": [{"magic": {"score_cfg": {"higher_is_better": False}}}]}
    (run / "scores" / "config.yaml").write_text(yaml.safe_dump(doc))

    out = write_report([run], top=2)
    assert out == run / "report"
    html, rows = parse(out)
    assert "magic (scores/)" in html and "lowest scores help" in html
    assert "corpus row 3 &lt;b&gt;" in html  # token row 8 is in document 3
    top0 = ranked(rows, 0, "top")
    assert [int(r["row"]) for r in top0] == [8, 7]
    assert "<td class=\"num\">3</td><td class=\"num\">2</td>" in html  # doc 3, token 2


# ------------------------------------------------------------------------- validate


def write_validate_run(path: Path, scores: np.ndarray, subsets: list[np.ndarray],
                       seed: int, bank: Path | None = None) -> Path:
    """A validate run as ``pipelines/validate.py`` writes it: same writers, same math."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    q = scores.shape[1]
    base = rng.uniform(2, 3, q)
    losses = base[None, :] - np.stack([scores[s].sum(0) for s in subsets]) \
        + 0.5 * rng.standard_normal((len(subsets), q))
    res = compute_lds(base, losses, scores, subsets, list(range(len(subsets))))
    csv_out.write_validation(path / "validation.csv", res, True)
    csv_out.write_summary(path / "summary.csv", res, True, len(subsets))
    save_subsets(path / "subsets.json", subsets)
    (path / "summary.json").write_text(json.dumps({"method": "lds", "mean_lds": res.mean_lds}))
    lds = {"subsets": "bank", "paths": [str(bank)]} if bank else {"subsets": "random"}
    (path / "config.yaml").write_text(yaml.safe_dump(
        {"steps": [{"validate": {"scores": f"/runs/{path.name}/scores", "lds": lds}}]}))
    return path


def summary_spearman(path: Path) -> dict[int, float]:
    with (path / "summary.csv").open() as f:
        return {int(r["query"]): float(r["spearman_corr"]) for r in csv.DictReader(f)}


def test_validate_report_lds_equals_summary_csv(tmp_path):
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((30, 4))
    subsets = [rng.choice(30, 15, replace=False) for _ in range(10)]
    run = write_validate_run(tmp_path / "val", scores, subsets, seed=3)
    with (run / "weight_step.csv").open("w") as f:  # a weight-step table beside it
        f.write("lr,query,diff,predicted_diff\n0.1,0,0.5,0.4\n0.2,0,1.1,0.9\n")
    out = write_report([run], out=tmp_path / "rep")
    html, rows = parse(out)
    lds = {int(r["query"]): float(r["spearman"]) for r in rows.rows if "spearman" in r}
    assert lds == summary_spearman(run)
    mean = np.mean(list(lds.values()))
    assert f"{mean:.6g}" in html
    assert {"v0_lds.png", "v0_scatter.png", "v0_weight_step.png"} <= set(rows.images)
    for name in rows.images:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_single_query_validate_run(tmp_path):
    """One aggregated query: summary.csv and validation.csv have no ``query`` column."""
    rng = np.random.default_rng(8)
    scores = rng.standard_normal((16, 1))
    subsets = [rng.choice(16, 8, replace=False) for _ in range(6)]
    base, losses = np.array([2.0]), 2.0 - np.stack([scores[s].sum(0) for s in subsets])
    res = compute_lds(base, losses + 0.1 * rng.standard_normal(losses.shape), scores, subsets,
                      list(range(6)))
    run = tmp_path / "val"
    run.mkdir()
    csv_out.write_validation(run / "validation.csv", res, False)
    csv_out.write_summary(run / "summary.csv", res, False, 6)
    out = write_report([run])
    _, rows = parse(out)
    (row,) = [r for r in rows.rows if "spearman" in r]
    assert row["query"] == "0" and float(row["spearman"]) == res.spearman[0].statistic
    assert (out / "v0_scatter.png").read_bytes()[:8] == PNG_MAGIC


def test_validate_runs_on_one_bank_are_compared(tmp_path):
    rng = np.random.default_rng(4)
    subsets = [rng.choice(20, 10, replace=False) for _ in range(8)]
    bank = tmp_path / "bank"
    good = write_validate_run(tmp_path / "ekfac", rng.standard_normal((20, 3)), subsets, 5, bank)
    other = write_validate_run(tmp_path / "trackstar", rng.standard_normal((20, 3)), subsets, 6, bank)
    lonely = write_validate_run(tmp_path / "lonely", rng.standard_normal((20, 3)),
                                [rng.choice(20, 10, replace=False) for _ in range(8)], 7)
    out = write_report([good, other, lonely], out=tmp_path / "rep")
    html, rows = parse(out)
    compared = {r["run"]: float(r["mean"]) for r in rows.rows if "mean" in r}
    assert set(compared) == {"ekfac", "trackstar"}  # lonely used other subsets
    for name, path in (("ekfac", good), ("trackstar", other)):
        assert compared[name] == pytest.approx(np.mean(list(summary_spearman(path).values())))
    assert f"Comparison on bank {bank.resolve()}" in html
    assert {"c0_mean.png", "c0_per_query.png"} <= set(rows.images)


# ---------------------------------------------------------------------------- latency


def test_latency_percentiles_and_page(tmp_path):
    ticks = iter(np.cumsum([0, 50e-3] + [0, 1e-3, 0, 3e-3, 0, 2e-3] * 4).tolist())
    calls = []
    samples, warm = measure(calls.append, ["a", "b", "c"], 4, clock=lambda: next(ticks))
    assert calls == ["a"] + ["a", "b", "c"] * 4
    np.testing.assert_allclose(samples, [1, 3, 2] * 4)
    assert warm == pytest.approx(50)
    rep = LatencyReport("svc", samples, warm, "3 x 4")
    assert rep.percentiles[50] == pytest.approx(np.percentile(samples, 50))
    out = write_report([], out=tmp_path / "lat", latency=rep)
    _, rows = parse(out)
    (row,) = [r for r in rows.rows if "p99" in r]
    assert float(row["p99"]) == pytest.approx(np.percentile(samples, 99))
    assert (out / "latency.png").read_bytes()[:8] == PNG_MAGIC


def test_service_without_a_model_is_timed_with_gradients():
    class Stub:
        def __init__(self):
            self.seen = []

        def info(self):
            return {"name": "idx", "model": False, "dim": 6, "rows": 10, "shards": [{}]}

        def query_gradients(self, g, k=10):
            self.seen.append((g.shape, k))
            return []

    stub = Stub()
    rep = service_latency(stub, [], repeats=2, k=3)
    assert stub.seen == [((1, 6), 3)] * 7 and len(rep.samples_ms) == 6
    assert rep.name == "idx" and "shards" not in rep.info


# ------------------------------------------------------------------------ bad inputs


def test_unknown_directory_gets_one_sentence(tmp_path, capsys):
    from bergson_ray.cli.main import main

    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("hi")
    with pytest.raises(BadInputError, match="neither a score run .* nor a validate run"):
        write_report([tmp_path / "odd"])
    assert main(["report", str(tmp_path / "odd")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "nothing to report" in err
    assert sorted(p.name for p in (tmp_path / "odd").iterdir()) == ["notes.txt"]


def test_output_is_atomic(tmp_path, monkeypatch):
    scores = np.random.default_rng(5).standard_normal((20, 3)).astype(np.float32)
    store = write_store(tmp_path / "run", scores)
    calls = []

    def flaky(values, path, title, xlabel="score"):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        path.write_bytes(PNG_MAGIC)
        return path

    monkeypatch.setattr(plots, "histogram", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report([store])
    assert sorted(p.name for p in store.iterdir()) == ["info.json", "scores.bin"]

    monkeypatch.undo()
    first = write_report([store], top=2)  # a complete report ...
    before = (first / INDEX).read_text()
    calls.clear()
    monkeypatch.setattr(plots, "histogram", flaky)
    with pytest.raises(RuntimeError):
        write_report([store], top=3)  # ... survives a failed rerun untouched
    assert (first / INDEX).read_text() == before
    assert sorted(p.name for p in store.iterdir()) == ["info.json", "report", "scores.bin"]


def test_never_replaces_a_directory_that_is_not_a_report(tmp_path):
    store = write_store(tmp_path / "run", np.ones((4, 1), np.float32))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("...")
    with pytest.raises(BadInputError, match="is not a report"):
        write_report([store], out=precious)
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    store = write_store(tmp_path / "run", np.ones((4, 1), np.float32))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BadInputError, match=r"pip install 'bergson_ray\[report\]'"):
        write_report([store])
    assert not (store / "report").exists()


def test_cli_end_to_end(tmp_path, capsys):
    from bergson_ray.cli.main import main

    scores = np.random.default_rng(6).standard_normal((12, 2)).astype(np.float32)
    store = write_store(tmp_path / "run", scores)
    assert main(["report", str(store), "--top", "2", "--max_queries", "1",
                 "--out", str(tmp_path / "r")]) == 0
    assert f"report written to {tmp_path / 'r' / INDEX}" in capsys.readouterr().out
    _, rows = parse(tmp_path / "r")
    assert {r["query"] for r in rows.rows} == {"0"} and len(rows.rows) == 4
