"""``recall``: ranks and metrics against hand-computed ones, the synthetic data (seeded,
every question with its gold statements), the tiny model end to end, score dirs written
by bergson, and bad input.

The end-to-end property: when each question's query gradient is that of one of its own
gold statements (the template-0 paraphrase), cosine scores rank that statement first
(its score is 1, every other document's is below 1), so MRR = Recall@1 = 1.
"""

from __future__ import annotations

import csv
import json
import os
import textwrap
from pathlib import Path

import anchor
import numpy as np
import pytest
import torch

from bergson_ray.config import as_config
from bergson_ray.config.recall import RecallConfig
from bergson_ray.errors import BadInputError, RunExistsError
from bergson_ray.recall.facts import FIELDS, TEMPLATES, builtin_names
from bergson_ray.recall.generate import build_rows, ensure_recall_datasets, gold_documents
from bergson_ray.recall.metrics import evaluate, gold_ranks, recall_metrics
from bergson_ray.store.run_dir import RunDir
from bergson_ray.store.score_writer import ScoreWriter

PARAPHRASES = sum(len(TEMPLATES[f]) for f in FIELDS)  # statements per person


# ------------------------------------------------------------------------------ metrics


def test_metrics_match_a_hand_computed_case():
    # 5 documents, 2 queries. Query 0: gold {1, 3}; scores rank docs 2 > 1 = 3 > 0 > 4, the
    # tie between 1 and 3 broken by row order: ranks 1->2, 3->3. Query 1: gold {4}; doc 4
    # ties docs 0 and 2 at the top (rows 0 and 2 come first): rank 3.
    scores = np.array(
        [[0.1, 5.0], [0.5, 1.0], [0.9, 5.0], [0.5, 2.0], [-1.0, 5.0]], dtype=np.float32
    )
    gold = [np.array([1, 3]), np.array([4])]
    np.testing.assert_array_equal(gold_ranks(scores[:, 0], gold[0]), [2, 3])
    np.testing.assert_array_equal(gold_ranks(scores[:, 1], gold[1]), [3])

    res = recall_metrics(scores, gold, k=2)
    np.testing.assert_array_equal(res.first_rank, [2, 3])
    assert res.mrr == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert res.recall_at_k == 0.5  # query 0 has a gold doc in the top 2, query 1 not
    assert res.strict_recall_at_k == pytest.approx((1 / 2 + 0) / 2)
    assert res.metrics() == {
        "mrr": res.mrr, "recall_at_2": 0.5, "strict_recall_at_2": res.strict_recall_at_k
    }
    assert recall_metrics(scores, gold, k=3).recall_at_k == 1.0

    # lower is better: query 0 now ranks 4 > 0 > 1 = 3 > 2 -> gold ranks 3 and 4
    low = recall_metrics(scores, gold, k=3, higher_is_better=False)
    assert low.first_rank[0] == 3 and low.strict_recall[0] == 0.5


def test_gold_ranks_are_a_stable_descending_sort():
    rng = np.random.default_rng(0)
    col = rng.integers(0, 6, size=200).astype(np.float64)  # many ties
    gold = np.sort(rng.choice(200, size=9, replace=False))
    position = np.empty(200, dtype=np.int64)
    position[np.argsort(-col, kind="stable")] = np.arange(1, 201)
    np.testing.assert_array_equal(gold_ranks(col, gold), position[gold])


def test_metrics_reject_bad_k_and_mismatched_queries():
    gold = [np.array([0])]
    for k in (0, -3, 1.5, True):
        with pytest.raises(BadInputError, match=r"^-k must be a whole number >= 1"):
            evaluate([np.zeros(3)], gold, k)
    with pytest.raises(BadInputError, match="more score columns than the 1 queries"):
        evaluate([np.zeros(3)] * 2, gold, 1)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_blockwise_columns_equal_the_store(tmp_path, dtype):
    from bergson_ray.recall.scores import open_scores
    from bergson_ray.store.score_store import ScoreStore

    matrix = torch.randn(37, 11)
    with ScoreWriter(tmp_path / "s", 37, 11, dtype) as w:
        w.write(np.arange(37), matrix)
    expected = ScoreStore.open(tmp_path / "s").scores.astype(np.float64)
    scores = open_scores(tmp_path / "s", higher_is_better=False)
    # 3 columns per block (3 * 37 * 4 bytes), 5 rows per read: ragged blocks and chunks
    got = np.stack(list(scores.columns(block_bytes=3 * 37 * 4, row_chunk=5)), axis=1)
    np.testing.assert_array_equal(got, -expected)


# ------------------------------------------------------------------------------ data


def test_generation_is_seeded_and_every_question_has_its_statements(tmp_path):
    rows = build_rows(_sources(tmp_path / "a"), 5, seed=1)
    assert rows == build_rows(_sources(tmp_path / "b"), 5, seed=1)  # same seed, same rows
    assert rows != build_rows(tmp_path / "a", 5, seed=2)

    statements, questions = rows
    assert len(questions) == 5 * len(FIELDS) and len(statements) == 5 * PARAPHRASES
    assert len({(q["identifier"], q["field"]) for q in questions}) == len(questions)
    gold = gold_documents(
        [s["identifier"] for s in statements], [s["field"] for s in statements],
        [q["identifier"] for q in questions], [q["field"] for q in questions],
    )
    for q, g in zip(questions, gold):
        assert len(g) == len(TEMPLATES[q["field"]])  # every paraphrase is gold
        assert q["text"] == f"{q['question']} {q['answer']}"
        person = " ".join(statements[g[0]]["fact"].split()[:2])  # template 0 opens with it
        assert person in q["question"]
        for i in g:  # each gold statement states this person's answer
            s = statements[i]
            assert (s["identifier"], s["field"], s["answer"]) == (
                q["identifier"], q["field"], q["answer"]
            )
            assert person in s["fact"] and str(q["answer"]) in s["fact"]

    single_s, single_q = build_rows(tmp_path / "a", 5, seed=1, single_paraphrase=True)
    assert [(s["identifier"], s["field"]) for s in single_s] == [
        (q["identifier"], q["field"]) for q in single_q
    ]  # one gold statement per question, in question order
    assert single_q == questions


def test_datasets_are_cached_by_identity_and_existing_lists_win(tmp_path):
    s_path, q_path = ensure_recall_datasets(tmp_path, 3, 0)
    assert (s_path.name, q_path.name) == ("statements_3p_seed0.hf", "questions_3p_seed0.hf")
    for name, lines in builtin_names().items():  # the lists bergson would read
        assert (tmp_path / "names" / f"{name}.txt").read_text().splitlines() == lines
    stamp = os.stat(s_path).st_mtime_ns
    assert ensure_recall_datasets(tmp_path, 3, 0) == (s_path, q_path)
    assert os.stat(s_path).st_mtime_ns == stamp  # reused, not regenerated

    custom = tmp_path / "custom"
    (custom / "names").mkdir(parents=True)
    (custom / "names" / "first_name.txt").write_text("Ada\nGrace\n")
    statements, _ = build_rows(_sources(custom), 2, seed=0)
    firsts = {s["fact"].split()[0] for s in statements if s["template"] == 0}
    assert firsts == {"Ada", "Grace"}  # every template 0 opens with the first name
    with pytest.raises(BadInputError, match="more than the name lists allow"):
        build_rows(custom, 3, seed=0)

    from bergson_ray.config.sections import DataConfig
    from bergson_ray.data.loading import load_dataset_rows

    ds = load_dataset_rows(DataConfig(dataset=str(s_path), prompt_column="fact"))
    assert len(ds) == 3 * PARAPHRASES and "fact" in ds.column_names


def _sources(data_dir: Path) -> Path:
    from bergson_ray.recall.facts import write_sources

    write_sources(data_dir)
    return data_dir


# ------------------------------------------------------------------------------ pipeline


def _write_scores(path: Path, matrix: np.ndarray, higher_is_better: bool | None = True) -> Path:
    """Our score dir holding ``matrix``, with ``score_cfg.higher_is_better`` recorded."""
    run = RunDir(path)
    with ScoreWriter(run.path, matrix.shape[0], matrix.shape[1]) as w:
        w.write(np.arange(matrix.shape[0]), torch.from_numpy(matrix.astype(np.float32)))
    if higher_is_better is not None:
        run.write_config({"score_cfg": {"higher_is_better": higher_is_better}}, command="score")
    return run.commit()


def _gold(data_dir: Path, people: int, single: bool = False) -> list[np.ndarray]:
    from datasets import load_from_disk

    s_path, q_path = ensure_recall_datasets(data_dir, people, 0, single)
    s, q = load_from_disk(str(s_path)), load_from_disk(str(q_path))
    return gold_documents(s["identifier"], s["field"], q["identifier"], q["field"])


def _oracle(gold: list[np.ndarray], n_docs: int, rank_of_gold: int) -> np.ndarray:
    """Scores where each query's first gold document sits at ``rank_of_gold``."""
    mat = np.zeros((n_docs, len(gold)), dtype=np.float32)
    for q, g in enumerate(gold):
        others = np.setdiff1d(np.arange(n_docs), g)[: rank_of_gold - 1]
        mat[others, q] = 2.0
        mat[g[0], q] = 1.0
    return mat


def test_recall_pipeline_outputs_and_orientation(tmp_path, capsys):
    from bergson_ray.cli.main import main
    from bergson_ray.pipelines.recall import recall

    data = tmp_path / "data"
    gold = _gold(data, 2)
    n_docs = 2 * PARAPHRASES
    matrix = _oracle(gold, n_docs, rank_of_gold=3)
    scores = _write_scores(tmp_path / "s", matrix)
    common = dict(scores=str(scores), num_people=2, data_dir=str(data))

    out = recall(run_path=str(tmp_path / "r"), k=3, **common)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mrr"] == pytest.approx(1 / 3) and summary["recall_at_3"] == 1.0
    assert summary["orientation"] == "config.yaml" and summary["higher_is_better"] is True
    rows = list(csv.DictReader((out / "recall.csv").open()))
    assert len(rows) == 2 * len(FIELDS)
    assert {r["first_gold_rank"] for r in rows} == {"3"}
    assert [r["num_gold"] for r in rows[:4]] == [str(len(TEMPLATES[f])) for f in FIELDS]
    assert next(csv.reader((out / "summary.csv").open())) == [
        "MRR", "recall_at_3", "strict_recall_at_3", "N", "num_people"
    ]
    with pytest.raises(RunExistsError):
        recall(run_path=str(out), k=3, **common)

    # --higher_is_better false overrides config.yaml: the negated scores are ranked
    low = recall(run_path=str(tmp_path / "low"), k=3, higher_is_better=False, **common)
    low_summary = json.loads((low / "summary.json").read_text())
    expected = recall_metrics(matrix, gold, 3, higher_is_better=False)
    assert low_summary["orientation"] == "--higher_is_better"
    assert low_summary["mrr"] == pytest.approx(expected.mrr) and expected.mrr < 1 / 3

    # the CLI, with bergson's -k, prints the table
    assert main(["recall", str(tmp_path / "cli"), "--scores", str(scores), "--num_people", "2",
                 "--data_dir", str(data), "-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "MRR" in printed and "0.3333" in printed and "Recall@2" in printed

    # config.yaml replays through a pipeline file (bergson's Recall step shape)
    from bergson_ray.cli.main import COMMANDS
    from bergson_ray.cli.pipeline_file import plan, read_document

    (step,) = plan(read_document(out / "config.yaml"), COMMANDS)
    assert step.config == as_config(RecallConfig, run_path=str(out), k=3, **common)


def test_bad_input_is_one_sentence_before_any_output(tmp_path):
    from bergson_ray.cli.main import main
    from bergson_ray.pipelines.recall import recall

    data = tmp_path / "data"
    gold = _gold(data, 2)
    n_docs, n_q = 2 * PARAPHRASES, len(gold)
    common = dict(num_people=2, data_dir=str(data))
    cases = {
        "rows": (np.zeros((n_docs - 1, n_q)), f"has {n_docs - 1} rows but"),
        "cols": (np.zeros((n_docs, n_q + 1)), f"has {n_q + 1} query columns but"),
        "nan": (np.full((n_docs, n_q), np.nan), "NaN scores in column 0"),
    }
    for name, (mat, message) in cases.items():
        path = _write_scores(tmp_path / name, mat)
        with pytest.raises(BadInputError, match=message) as err:
            recall(run_path=str(tmp_path / f"out_{name}"), scores=str(path), **common)
        assert "\n" not in str(err.value)
        assert not list(tmp_path.glob(f"out_{name}*"))  # nothing written

    good = _write_scores(tmp_path / "good", np.zeros((n_docs, n_q)))
    for k in (0, -1):
        with pytest.raises(BadInputError, match=r"-k must be a whole number >= 1"):
            recall(run_path=str(tmp_path / "k"), scores=str(good), k=k, **common)
    with pytest.raises(BadInputError, match="recall needs --scores"):
        as_config(RecallConfig, run_path=str(tmp_path / "x"))
    with pytest.raises(BadInputError, match="--num_people must be >= 1"):
        as_config(RecallConfig, run_path="x", scores=str(good), num_people=0)
    assert main(["recall", str(tmp_path / "k"), "--scores", str(good), "-k", "0"]) == 2
    assert not (tmp_path / "k").exists() and not (tmp_path / "k.part").exists()

    tokens = dict(attribute_tokens=True, offsets=np.array([0, 2, 4]))
    with ScoreWriter(tmp_path / "tokens", 4, n_q, **tokens) as w:
        w.write(np.arange(4), torch.zeros(4, n_q))
    with pytest.raises(BadInputError, match="per-token scores"):
        recall(run_path=str(tmp_path / "t"), scores=str(tmp_path / "tokens"), **common)


def test_duplicate_query_gradients_rank_their_statement_first(tmp_path, tiny_assets):
    """Tiny model, all paraphrases: each question's query gradient is that of its
    template-0 statement. The gradients and cosine scores come from the runner every
    ``build``/``score`` worker runs (in process here: Ray adds nothing to the property)."""
    from datasets import load_from_disk

    from bergson_ray.config import (
        BatchConfig,
        DataConfig,
        GradientConfig,
        ModelConfig,
        PreprocessConfig,
    )
    from bergson_ray.pipelines.recall import recall
    from bergson_ray.runners.gradient_runner import GradientRunner, RunnerSpec

    data = tmp_path / "data"
    s_path, _ = ensure_recall_datasets(data, 2, 0)
    statements = load_from_disk(str(s_path))
    runner = GradientRunner(
        RunnerSpec(
            model=ModelConfig(model="tiny"),
            grad=GradientConfig(projection_dim=16),
            data=DataConfig(dataset=str(s_path), prompt_column="fact"),
            batch=BatchConfig(),
            preprocess=PreprocessConfig(unit_normalize=True),
        )
    )
    idx = np.arange(len(statements))
    rows = torch.from_numpy(runner.gradients(idx)["grads"]).float()  # unit norm
    first = [i for i, t in enumerate(statements["template"]) if t == 0]  # question order
    matrix = runner.scores(idx, rows[first], "individual", None)["scores"]
    assert matrix.shape == (2 * PARAPHRASES, 2 * len(FIELDS))
    scores = _write_scores(tmp_path / "s", matrix)

    out = recall(run_path=str(tmp_path / "r"), scores=str(scores), num_people=2,
                 data_dir=str(data), k=1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_questions"] == 2 * len(FIELDS)
    assert summary["num_statements"] == 2 * PARAPHRASES
    assert summary["mrr"] == 1.0 and summary["recall_at_1"] == 1.0


# ------------------------------------------------------------------------------ bergson

_BERGSON_SIDE = """
import json, shutil, sys
from pathlib import Path
import numpy as np
import yaml
from bergson.config.config import RecallConfig, RecallDataConfig
from bergson.recall.recall import run_recall
from bergson.score.score_writer import save_sequence_scores

ours, fresh, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
matrix = np.load(out / "matrix.npy")
save_sequence_scores(out / "scores", matrix)
(out / "scores" / "config.yaml").write_text(yaml.safe_dump(
    {"steps": [{"score": {"score_cfg": {"higher_is_better": False}}}]}))
data = RecallDataConfig(num_people=3, seed=1, data_dir=str(ours))
metrics = run_recall(RecallConfig(run_path=str(out / "bergson_recall"),
                                  scores=str(out / "scores"), data=data, k=4))
# bergson's own generation from the lists we wrote, in a directory of its own
fresh.mkdir()
shutil.copytree(ours / "names", fresh / "names")
shutil.copytree(ours / "templates", fresh / "templates")
from bergson.recall.generate import ensure_recall_datasets
ensure_recall_datasets(RecallDataConfig(num_people=3, seed=1, data_dir=str(fresh)))
print(json.dumps(metrics))
"""


@anchor.needs_venv
def test_bergson_agrees_on_data_scores_and_metrics(tmp_path):
    """bergson's score dir (lower-is-better, with ties) read by us gives bergson's
    recall.csv; bergson generates the very same datasets from the lists we wrote."""
    from datasets import load_from_disk

    from bergson_ray.pipelines.recall import recall

    ours = tmp_path / "ours"
    gold = _gold(ours, 3)
    n_docs = 3 * PARAPHRASES
    rng = np.random.default_rng(3)
    matrix = rng.integers(0, 5, size=(n_docs, len(gold))).astype(np.float32)  # ties
    np.save(tmp_path / "matrix.npy", matrix)
    proc = anchor.run(
        ["python", "-c", textwrap.dedent(_BERGSON_SIDE), ours, tmp_path / "fresh", tmp_path],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])

    out = recall(run_path=str(tmp_path / "r"), scores=str(tmp_path / "scores"), num_people=3,
                 seed=1, data_dir=str(ours), k=4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["higher_is_better"] is False and summary["orientation"] == "config.yaml"
    assert {k: summary[k] for k in theirs} == theirs
    for name in ("recall.csv", "summary.csv"):
        assert (out / name).read_text() == (tmp_path / "bergson_recall" / name).read_text()
    for name in ("statements_3p_seed1.hf", "questions_3p_seed1.hf"):
        a = load_from_disk(str(ours / name))
        b = load_from_disk(str(tmp_path / "fresh" / name))
        assert a.column_names == b.column_names and a.to_list() == b.to_list()
