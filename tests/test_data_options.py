"""bergson's data options: --chunk_length, --format_template, --advantage_column,
--logit_scale, --max_tokens (issue #17, items 3-5).

Mostly no Ray: the chunk layout, template rendering and masking, the sandbox, the
option combinations, and the gradients (in-process runners and autograd) are checked
directly; one tiny chunked ``build`` runs end to end on Ray; one interop test compares
the chunk layout and the token cap with bergson's own functions (skipped without the
anchor venv).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import anchor
import datasets
import numpy as np
import pytest
import torch
from anchor import needs_venv
from helpers import pad_batch, random_docs, rel, tiny_neox

from bergson_ray.config import BatchConfig, BuildConfig, DataConfig, GradientConfig, as_config
from bergson_ray.data.chunking import ChunkPlan, chunk_documents, token_ids
from bergson_ray.data.row_plan import RowPlan, plan_chunks, select_max_tokens
from bergson_ray.data.templates import load_template
from bergson_ray.data.tokenize import IGNORE_INDEX, estimate_advantages, tokenize_rows
from bergson_ray.defaults.tiny import load_tiny_tokenizer
from bergson_ray.errors import BadInputError
from bergson_ray.gradients.engine import GradientEngine
from bergson_ray.gradients.losses import per_document_loss, scale_logits
from bergson_ray.gradients.modules import find_target_modules


@pytest.fixture(scope="module")
def tok(tiny_assets):
    return load_tiny_tokenizer(tiny_assets)


# ----------------------------------------------------------------------------- chunking

DOCS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
ROWS = [0, 2, 3, 5]  # dataset rows of the documents (rows 1 and 4 were empty)


def test_chunks_of_a_hand_computed_stream():
    """Stream 1 2 3 E | 4 5 E | 6 7 8 9 10 E | 11 E (E = eos 0), cut every 4 tokens;
    the last 3 tokens (10 E 11 E minus the full chunk) are a partial chunk and dropped."""
    ids, doc_ids = chunk_documents(DOCS, ROWS, chunk_length=4, eos_id=0)
    assert ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10]]
    assert doc_ids.tolist() == [[0, 0, 0, 0], [2, 2, 2, 3], [3, 3, 3, 3]]

    plan = ChunkPlan.from_counts(np.array(ROWS), np.array([len(d) for d in DOCS]), 4, 0)
    assert len(plan) == 3 and plan.starts.tolist() == [0, 4, 7, 13, 15]
    asked: list[list[int]] = []

    def tokens(positions):
        asked.append(positions.tolist())
        return [DOCS[p] for p in positions]

    # any subset, any order: only the documents those chunks overlap are read
    assert plan.assemble([2, 0], tokens).tolist() == [ids[2].tolist(), ids[0].tolist()]
    assert asked == [[0, 2]]
    assert plan.doc_ids([1, 2]).tolist() == doc_ids[1:].tolist()
    with pytest.raises(BadInputError, match="differs between the driver and this worker"):
        plan.assemble([0], lambda pos: [[1, 2]])


def test_chunk_plan_of_a_dataset_skips_empty_documents(tok):
    texts = ["alpha beta gamma", "", "delta epsilon", "   ", "zeta eta theta iota kappa"]
    ds = datasets.Dataset.from_dict({"text": texts})
    plan = plan_chunks(ds, DataConfig(chunk_length=5), tok, max_length=512)
    kept = [0, 2, 4]
    assert plan.doc_rows.tolist() == kept
    want_ids, want_docs = chunk_documents(
        token_ids(tok, [texts[i] for i in kept]), kept, 5, tok.eos_token_id
    )
    every = list(range(len(plan)))
    assert plan.assemble(every, lambda p: token_ids(tok, [texts[kept[i]] for i in p])).tolist() == (
        want_ids.tolist()
    )
    assert plan.doc_ids(every).tolist() == want_docs.tolist()
    with pytest.raises(BadInputError, match="exceeds the model's maximum context length 4"):
        plan_chunks(ds, DataConfig(chunk_length=5), tok, max_length=4)
    with pytest.raises(BadInputError, match="do not fill a single chunk"):
        plan_chunks(ds, DataConfig(chunk_length=500), tok, max_length=512)


def test_chunked_build_rows_are_the_gradients_of_the_chunks(tmp_path, tiny_assets, tok, ray_session):
    """End to end: one store row per chunk, equal to the in-process gradient of that
    chunk's tokens (every token a target), doc_ids in data.hf, chunk_length in config.yaml
    (so --resume with another value is refused)."""
    from bergson_ray import build
    from bergson_ray.config import ModelConfig
    from bergson_ray.data.batching import collate
    from bergson_ray.data.tokenize import TokenizedDoc
    from bergson_ray.runners.gradient_runner import GradientRunner, RunnerSpec
    from bergson_ray.store.config_yaml import check_resume_settings
    from bergson_ray.store.gradient_store import GradientStore

    split, length = "train[:8]", 32
    run = build(
        run_path=str(tmp_path / "chunks"), dataset="tiny", split=split, projection_dim=4,
        chunk_length=length, num_workers=1, token_batch_size=256,
    )
    texts = datasets.load_from_disk(str(tiny_assets.corpus_dir))["text"][:8]
    kept = [i for i, t in enumerate(texts) if t.strip()]
    want_ids, want_docs = chunk_documents(
        token_ids(tok, [texts[i] for i in kept]), kept, length, tok.eos_token_id
    )
    store = GradientStore.open(run)
    assert store.num_grads == len(want_ids) >= 3
    data = datasets.load_from_disk(str(run / "data.hf"))
    assert data.column_names == ["doc_ids", "length", "loss"]
    assert data["doc_ids"] == want_docs.tolist() and set(data["length"]) == {length}

    spec = RunnerSpec(
        model=ModelConfig(), grad=GradientConfig(projection_dim=4),
        data=DataConfig(split=split), batch=BatchConfig(token_batch_size=4096),
    )
    engine = GradientRunner(spec).engine
    docs = [TokenizedDoc(input_ids=r, labels=r.copy()) for r in want_ids]
    want = engine.compute(collate(docs)).rows.numpy()
    got = store.rows(np.arange(store.num_grads)).numpy()
    assert rel(got, want) < 1e-5

    cfg = as_config(BuildConfig, None, run_path=str(run), dataset="tiny", split=split,
                    projection_dim=4, chunk_length=length, num_workers=1, token_batch_size=256)
    check_resume_settings(run, "build", cfg)  # same settings: accepted
    other = as_config(BuildConfig, cfg, chunk_length=length + 1)
    with pytest.raises(BadInputError, match="--chunk_length: started with 32, now 33"):
        check_resume_settings(run, "build", other)


# ----------------------------------------------------------------------------- templates

CHOICES = [["red", "green", "blue", "grey"], ["one", "two", "three", "four"]]
MCQA_ROWS = {"question": [" Which colour? ", "How many?"], "choices": CHOICES, "answer": [2, 0]}


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "format.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_template_renders_target_and_masks_the_prompt(tok, tmp_path):
    """mcqa: the rendered prompt/completion pair tokenizes exactly as the same pair given
    as prompt/completion columns (chat template), and only the answer carries loss."""
    docs = tokenize_rows(MCQA_ROWS, tok, DataConfig(format_template="mcqa"), 512)
    prompts = [
        "Which colour?\nA. red\nB. green\nC. blue\nD. grey\nAnswer:",
        "How many?\nA. one\nB. two\nC. three\nD. four\nAnswer:",
    ]
    by_hand = tokenize_rows(
        {"p": prompts, "c": ["C", "A"]}, tok,
        DataConfig(prompt_column="p", completion_column="c"), 512,
    )
    for d, h, answer in zip(docs, by_hand, ["C", "A"]):
        assert d.input_ids.tolist() == h.input_ids.tolist()
        assert d.labels.tolist() == h.labels.tolist()
        target = np.flatnonzero(d.labels != IGNORE_INDEX)
        assert tok.decode(d.input_ids[target]).strip() == answer
        assert (d.labels[: target[0]] == IGNORE_INDEX).all()  # the whole prompt is masked
    # the same template as a YAML file, with a templated target; no target = plain text
    path = _write(tmp_path, """
        doc_to_text: "{{ question.strip() }}"
        doc_to_target: "{{ answer }}"
        doc_to_choice: [A, B, C, D]
        task: ignored-lm-eval-key
    """)
    assert load_template(path).render(MCQA_ROWS) == {
        "prompt": ["Which colour?", "How many?"], "completion": ["C", "A"]
    }
    plain = _write(tmp_path, 'doc_to_text: "Q: {{ question.strip() }} A: {{ choices[answer] }}"')
    docs = tokenize_rows(MCQA_ROWS, tok, DataConfig(format_template=plain), 512)
    want = tokenize_rows({"text": ["Q: Which colour? A: blue", "Q: How many? A: one"]}, tok,
                         DataConfig(), 512)
    assert [d.input_ids.tolist() for d in docs] == [w.input_ids.tolist() for w in want]
    assert all((d.labels == d.input_ids).all() for d in docs)
    assert load_template(plain).columns() == ["answer", "choices", "question"]


@pytest.mark.parametrize(
    "text", ["{{ ''.__class__.__mro__ }}", "{{ question.__class__ }}", "{{ cycler.__init__ }}"]
)
def test_sandbox_refuses_access_to_internals(tmp_path, tok, text):
    path = _write(tmp_path, f'doc_to_text: "{text}"')
    with pytest.raises(BadInputError, match=r"refused by the sandbox .*: templates may only read"):
        tokenize_rows(MCQA_ROWS, tok, DataConfig(format_template=path), 512)


@pytest.mark.parametrize(
    "body,match",
    [
        ("doc_to_target: answer", "needs doc_to_text"),
        ('doc_to_text: "{{ x"', "is not valid Jinja2"),
        ("doc_to_text: hi\ndoc_to_choice: [A, B]", "doc_to_choice needs a doc_to_target"),
        ("doc_to_text: [1, 2", "is not valid YAML"),
    ],
)
def test_bad_template_files_are_one_sentence(tmp_path, body, match):
    with pytest.raises(BadInputError, match=match):
        load_template(_write(tmp_path, body))


def test_template_index_outside_the_choices(tok):
    rows = {**MCQA_ROWS, "answer": [2, 7]}
    with pytest.raises(BadInputError, match="row 1 of this batch: doc_to_target gave 7, outside"):
        tokenize_rows(rows, tok, DataConfig(format_template="mcqa"), 512)


# ----------------------------------------------------------------------------- combinations


@pytest.mark.parametrize(
    "flags,match",
    [
        ({"chunk_length": 64, "truncation": True}, "--chunk_length and --truncation cannot both"),
        ({"chunk_length": 64, "format_template": "mcqa"}, "--chunk_length and --format_template"),
        ({"chunk_length": 64, "completion_column": "c"}, "chunks the plain text"),
        ({"chunk_length": 64, "advantage_column": "a"}, "not rollouts"),
        ({"chunk_length": 64, "max_tokens": 100}, "does not apply to --chunk_length"),
        ({"chunk_length": 1}, "--chunk_length must be 0"),
        ({"reward_column": "r", "advantage_column": "a"}, "not both"),
        ({"format_template": "mcqa", "reward_column": "r"}, "pass --advantage_column instead"),
        ({"format_template": "mcqa", "conversation_column": "m"}, "writes the prompt and"),
        ({"max_tokens": 0}, "--max_tokens must be >= 1"),
        ({"logit_scale": 0.0}, "--logit_scale must be a finite, nonzero number"),
    ],
)
def test_incompatible_options_are_one_sentence(flags, match):
    with pytest.raises(BadInputError, match=match):
        as_config(BuildConfig, None, run_path="x", **flags)


def test_commands_without_row_plans_refuse_chunking_and_caps():
    """Only the commands that map rows through a plan accept --chunk_length/--max_tokens;
    any other reader of the dataset refuses them instead of silently reading every row."""
    from bergson_ray.data.loading import load_dataset_rows

    for flags, flag in (({"chunk_length": 8}, "--chunk_length"), ({"max_tokens": 8}, "--max_tokens")):
        with pytest.raises(BadInputError, match=f"{flag} is supported by build, score, reduce"):
            load_dataset_rows(DataConfig(**flags))


def test_bergson_steps_carry_the_options_through():
    """bergson's pipeline YAML keys land in our configs; a command without the option
    still takes bergson's default (bergson writes every key) and refuses anything else."""
    from bergson_ray.config.bergson_steps import step_config
    from bergson_ray.config.training import TrainRunConfig

    body = {"index_cfg": {"run_path": "x", "logit_scale": 2.0, "max_tokens": 500, "data": {
        "format_template": "mcqa", "advantage_column": "adv", "chunk_length": 0}}}
    cfg = step_config("build", body, BuildConfig, "step 0")
    assert (cfg.grad.logit_scale, cfg.data.max_tokens) == (2.0, 500)
    assert (cfg.data.format_template, cfg.data.advantage_column) == ("mcqa", "adv")
    body = {"index_cfg": {"run_path": "x", "data": {"chunk_length": 256}}}
    assert step_config("build", body, BuildConfig, "step 0").data.chunk_length == 256
    step_config("train", {"run_path": "x", "logit_scale": 1.0}, TrainRunConfig, "step 0")
    with pytest.raises(BadInputError, match="logit_scale=3.0 is not supported"):
        step_config("train", {"run_path": "x", "logit_scale": 3.0}, TrainRunConfig, "step 0")


# ----------------------------------------------------------------------------- advantages


def test_advantage_column_weights_like_reward_advantages(tmp_path, tiny_assets):
    """Through the driver (``open_dataset``) and a worker's runner, --advantage_column with
    the Dr. GRPO advantages of some rewards gives the rows --reward_column gives, and each
    row is its advantage times the unweighted row."""
    from bergson_ray.pipelines.stages import open_dataset, runner_spec
    from bergson_ray.runners.gradient_runner import GradientRunner

    text = datasets.load_from_disk(str(tiny_assets.corpus_dir))["text"][:2]
    prompts = [text[0], text[0], text[1], text[1]]  # two prompts, two rollouts each
    rewards = [1.0, 0.0, 3.0, -1.0]
    adv = estimate_advantages(prompts, rewards, skip_nan=False)
    assert adv.tolist() == [0.5, -0.5, 2.0, -2.0]
    path = tmp_path / "grpo"
    datasets.Dataset.from_dict({"text": prompts, "reward": rewards, "adv": adv.tolist()}).save_to_disk(
        str(path)
    )

    def config(dataset, **data):
        return as_config(BuildConfig, None, run_path="x", dataset=str(dataset), projection_dim=4,
                         truncation=True, **data)

    runner = GradientRunner(runner_spec(config(path), "cpu", None))  # one model for all

    def rows(dataset, **data):
        ds, runner.spec.advantages = open_dataset(config(dataset, **data))
        return runner.gradients(np.arange(len(ds)))["grads"]

    from_column = rows(path, advantage_column="adv")
    assert rel(from_column, rows(path, reward_column="reward")) < 1e-6
    plain = rows(path)
    assert rel(from_column, plain * adv[:, None].astype(np.float32)) < 1e-5

    bad = tmp_path / "nan"
    datasets.Dataset.from_dict({"text": ["a b c", "d e f"], "adv": [1.0, float("nan")]}).save_to_disk(
        str(bad)
    )
    with pytest.raises(BadInputError, match=r"1 advantage\(s\) in column 'adv' are NaN"):
        rows(bad, advantage_column="adv")


# ----------------------------------------------------------------------------- logit scale


def test_logit_scale_gives_the_gradient_of_the_scaled_loss():
    """Rows with --logit_scale s equal autograd's gradient of loss(s * logits)."""
    s = 2.5
    model = tiny_neox()
    cfg = GradientConfig(logit_scale=s)
    docs = random_docs((9, 5))
    modules = find_target_modules(model, cfg)
    truth = []
    for doc in docs:
        model.zero_grad()
        model.requires_grad_(True)
        batch = pad_batch([doc])
        per_document_loss(s * model(batch.input_ids).logits, batch.labels).sum().backward()
        truth.append(torch.cat([m.weight.grad.reshape(-1) for m in modules.values()]))
        model.requires_grad_(False)
    model.zero_grad()
    engine = GradientEngine(model, cfg)
    plain = engine.compute(pad_batch(docs)).rows
    handle = scale_logits(model, s)
    scaled = engine.compute(pad_batch(docs)).rows
    handle.remove()
    for i in range(len(docs)):
        assert rel(scaled[i], truth[i]) < 1e-5
        assert rel(plain[i], truth[i]) > 1e-2  # the scale matters
    assert scale_logits(model, 1.0) is None


# ----------------------------------------------------------------------------- max_tokens


@pytest.mark.parametrize(
    "lengths,cap,rows",
    [
        ([5, 3, 4, 2], 8, [0, 1]),  # a prefix: 5 + 3 = 8 fits exactly
        ([5, 3, 4, 2], 11, [0, 1]),  # 5 + 3 + 4 = 12 > 11 stops the prefix
        ([5, 1, 4, 2], 7, [0, 1]),  # stops at the first overflow, never skips ahead
        ([5, 3, 4, 2], 14, [0, 1, 2, 3]),  # the whole dataset exactly
        ([2, 3], 12, [0, 1, 0, 1, 0]),  # 5 tokens: twice, then 2 left: row 0 (2) fits
        ([2, 3], 14, [0, 1, 0, 1, 0]),  # 4 left: row 0 fits, row 1 (3 > 2 left) does not
        ([2, 3], 15, [0, 1, 0, 1, 0, 1]),  # exactly three times, nothing after
        ([4, 1], 14, [0, 1, 0, 1, 0]),  # 5 x 2, then 4 left: row 0 fits, row 1 (1 > 0) not
        ([1, 4], 13, [0, 1, 0, 1, 0]),  # 5 x 2, then 3 left: row 0 fits, row 1 (4 > 2) not
    ],
)
def test_max_tokens_selects_bergsons_rows(lengths, cap, rows):
    assert select_max_tokens(np.array(lengths), cap).tolist() == rows


def test_max_tokens_without_a_fitting_document_is_one_sentence():
    with pytest.raises(BadInputError, match="smaller than the first document"):
        select_max_tokens(np.array([10, 1]), 5)


def test_max_tokens_runner_reads_the_planned_rows(tiny_assets):
    """A --max_tokens plan repeats dataset rows: each store row is its source row's
    gradient, computed by the same runner without a plan."""
    from bergson_ray.pipelines.stages import plan_rows
    from bergson_ray.runners.gradient_runner import GradientRunner, RunnerSpec

    base = dict(run_path="x", dataset="tiny", split="train[:3]", projection_dim=4, truncation=True)
    cfg = as_config(BuildConfig, None, **base)
    one_to_one = GradientRunner(RunnerSpec(cfg.model, cfg.grad, cfg.data, cfg.batch))
    plain = one_to_one.gradients(np.arange(3))
    total = int(plain["length"].sum())
    capped = as_config(BuildConfig, None, **base, max_tokens=2 * total + int(plain["length"][0]))
    from bergson_ray.data.loading import load_dataset_rows

    plan = plan_rows(capped, load_dataset_rows(capped.data, planned=True))
    assert isinstance(plan, RowPlan) and plan.source.tolist() == [0, 1, 2, 0, 1, 2, 0]
    runner = GradientRunner(RunnerSpec(capped.model, capped.grad, capped.data, capped.batch, rows=plan))
    got = runner.gradients(np.arange(len(plan)))
    np.testing.assert_array_equal(got["length"], plain["length"][plan.source])
    assert rel(got["grads"], plain["grads"][plan.source]) < 1e-6


# ----------------------------------------------------------------------------- interop

BERGSON_SIDE = """
import json, sys, types
import datasets
from transformers import AutoTokenizer
from bergson.data import tokenize_and_chunk
from bergson.utils.worker_utils import filter_by_max_tokens

args = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(args["tokenizer"])
ds = datasets.Dataset.from_dict({"text": args["texts"]})
chunked = tokenize_and_chunk(ds, tok, chunk_size=args["chunk_length"], num_proc=1)
caps = []
for lengths, cap in args["caps"]:
    rows = datasets.Dataset.from_dict({"length": lengths, "row": list(range(len(lengths)))})
    caps.append(list(filter_by_max_tokens(rows, types.SimpleNamespace(max_tokens=cap))["row"]))
print(json.dumps({"input_ids": list(chunked["input_ids"]), "doc_ids": list(chunked["doc_ids"]), "caps": caps}))
"""


@needs_venv
def test_bergson_chunks_and_caps_the_same_rows(tiny_assets, tok):
    """bergson's own tokenize_and_chunk and filter_by_max_tokens, on the same texts and
    lengths, give our chunks, doc_ids and capped rows."""
    texts = datasets.load_from_disk(str(tiny_assets.corpus_dir))["text"][:12]
    texts = texts[:3] + ["", "  "] + texts[3:]
    caps = [([5, 3, 4, 2], 11), ([5, 1, 4, 2], 7), ([2, 3], 14), ([2, 3], 15), ([4, 1], 14)]
    args = {"tokenizer": str(tiny_assets.model_dir), "texts": texts, "chunk_length": 40, "caps": caps}
    out = anchor.run(["python", "-c", BERGSON_SIDE, json.dumps(args)], timeout=540)
    assert out.returncode == 0, out.stderr[-2000:]
    theirs = json.loads(out.stdout.strip().splitlines()[-1])

    ds = datasets.Dataset.from_dict({"text": texts})
    plan = plan_chunks(ds, DataConfig(chunk_length=40), tok, max_length=512)
    every = list(range(len(plan)))
    ours = plan.assemble(every, lambda p: token_ids(tok, [texts[plan.doc_rows[i]] for i in p]))
    assert ours.tolist() == theirs["input_ids"]
    assert plan.doc_ids(every).tolist() == theirs["doc_ids"]
    assert [select_max_tokens(np.array(n), c).tolist() for n, c in caps] == theirs["caps"]
