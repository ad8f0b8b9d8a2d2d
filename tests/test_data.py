"""Data layer: loading, tokenization/label masks, advantages, token-budget packing."""

from __future__ import annotations

import json
import pickle
import random

import datasets
import numpy as np
import pytest
import torch

from bergson_ray.config import DataConfig
from bergson_ray.data.batching import collate, pack_by_token_budget
from bergson_ray.data.loading import DatasetRows, check_columns, load_dataset_rows
from bergson_ray.data.tokenize import (
    IGNORE_INDEX,
    TokenizedDoc,
    estimate_advantages,
    tokenize_rows,
)
from bergson_ray.defaults.tiny import load_tiny_tokenizer
from bergson_ray.defaults.tiny_build import CHAT_TEMPLATE
from bergson_ray.errors import BadInputError
from bergson_ray.utils.kv import parse_kv

# ----------------------------------------------------------------------------- packing


def _check_packing(lengths, budget, cap, batches):
    flat = [p for b in batches for p in b]
    assert sorted(flat) == list(range(len(lengths))), "every position exactly once"
    firsts = []
    for b in batches:
        lens = [lengths[p] for p in b]
        assert lens == sorted(lens, reverse=True), "longest first within a batch"
        if len(b) > 1:  # a singleton may exceed the budget (one oversized doc)
            assert max(lens) * len(b) <= budget
        if cap is not None:
            assert len(b) <= cap
        firsts.append(lens[0])
    assert firsts == sorted(firsts, reverse=True), "batches come longest first"


def test_packing_respects_budget_and_covers_each_doc_once():
    rng = random.Random(1234)
    for _ in range(300):
        n = rng.randint(0, 60)
        lengths = [rng.randint(0, 300) for _ in range(n)]
        budget = rng.randint(1, 1200)
        cap = rng.choice([None, 1, 3, 8])
        batches = pack_by_token_budget(lengths, budget, cap)
        _check_packing(lengths, budget, cap, batches)
        # Greedy packing is tight: the next batch's first doc could not have joined.
        for prev in batches[:-1]:
            full_by_cap = cap is not None and len(prev) == cap
            joined = lengths[prev[0]] * (len(prev) + 1)
            assert full_by_cap or joined > budget


def test_oversized_doc_gets_its_own_batch():
    batches = pack_by_token_budget([5, 100, 5, 5], token_batch_size=20, max_batch_size=None)
    assert batches[0] == [1]
    assert sorted(batches[1]) == [0, 2, 3]


def test_packing_rejects_bad_budget():
    with pytest.raises(BadInputError, match="token_batch_size"):
        pack_by_token_budget([3, 4], 0, None)
    with pytest.raises(BadInputError, match="max_batch_size"):
        pack_by_token_budget([3, 4], 10, 0)


def test_rows_are_handed_out_longest_text_first():
    """Prompt plus completion UTF-8 bytes, longest first, ties in row order; a subset
    keeps to its rows; a row plan, a chat column or a non-text column leaves the order
    alone."""
    from bergson_ray.data.length_order import longest_first, text_lengths

    ds = datasets.Dataset.from_dict(
        {"p": ["ab", "éé", "", "abc", "xy", None], "c": ["1", "", "12345", "", "1", "22"]}
    ).select([5, 0, 1, 2, 3, 4])  # an indices mapping, as a filtered dataset has
    cfg = DataConfig(prompt_column="p", completion_column="c")
    assert text_lengths(ds, cfg).tolist() == [2, 3, 4, 5, 3, 3]  # "éé": 4 bytes
    assert longest_first(ds, np.arange(6), cfg).tolist() == [3, 2, 1, 4, 5, 0]
    assert longest_first(ds, np.array([5, 0, 3]), cfg).tolist() == [3, 5, 0]
    assert longest_first(ds, np.arange(6), cfg, plan=object()).tolist() == list(range(6))
    chat = DataConfig(prompt_column="p", conversation_column="c")
    assert text_lengths(ds, chat) is None
    numbers = datasets.Dataset.from_dict({"text": [1, 22, 3]})
    assert longest_first(numbers, np.arange(3), DataConfig()).tolist() == [0, 1, 2]


def test_windows_are_consecutive_slices_of_window_size():
    """What a worker sees: the rows in their order, ``window`` at a time (Ray's
    ``map_batches(batch_size=window)`` cuts the same), every row once."""
    from bergson_ray.pipelines.workers import index_windows

    rows = np.array([7, 3, 9, 0, 4, 1, 8])
    assert [w.tolist() for w in index_windows(rows, 3)] == [[7, 3, 9], [0, 4, 1], [8]]
    assert [w.tolist() for w in index_windows(rows, 10)] == [rows.tolist()]
    assert index_windows(np.zeros(0, np.int64), 4) == []


def test_longest_first_windows_pack_tighter_on_the_tiny_corpus(tiny_assets):
    """Why the order exists: 64-row windows cut from it pack into fewer and less padded
    token batches than windows cut in the dataset's order."""
    from bergson_ray.data.length_order import longest_first
    from bergson_ray.pipelines.workers import index_windows

    ds = datasets.load_from_disk(str(tiny_assets.corpus_dir))
    tok = load_tiny_tokenizer()
    lengths = np.array([min(len(t), 512) for t in tok(list(ds["text"]))["input_ids"]])

    def cost(order):
        batches = [lengths[w][b] for w in index_windows(order, 64)
                   for b in pack_by_token_budget(lengths[w], 512)]  # fmt: skip
        return len(batches), sum(len(b) * b.max() for b in batches)

    plain = cost(np.arange(len(ds)))
    ordered = cost(longest_first(ds, np.arange(len(ds)), DataConfig()))
    assert ordered[0] < plain[0] and ordered[1] < plain[1]


def test_collate_pads_right_and_masks_padding():
    docs = [
        TokenizedDoc(np.array([5, 6, 7], dtype=np.int64), np.array([-100, 6, 7]), 2.0),
        TokenizedDoc(np.array([8], dtype=np.int64), np.array([8]), -0.5),
    ]
    b = collate(docs, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b.labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b.lengths.tolist() == [3, 1]
    assert b.advantage.dtype == torch.float32 and b.advantage.tolist() == [2.0, -0.5]
    assert b.input_ids.dtype == torch.int64 and b.labels.dtype == torch.int64


# ----------------------------------------------------------------------------- tokenize


@pytest.fixture(scope="module")
def tok(tiny_assets):
    return load_tiny_tokenizer(tiny_assets)


def _labelled_runs(doc: TokenizedDoc) -> list[np.ndarray]:
    """Contiguous runs of target tokens."""
    mask = doc.labels != IGNORE_INDEX
    runs, cur = [], []
    for i, m in enumerate(mask):
        if m:
            cur.append(doc.labels[i])
        elif cur:
            runs.append(np.array(cur))
            cur = []
    if cur:
        runs.append(np.array(cur))
    return runs


def test_plain_text_every_token_is_a_target(tok):
    cfg = DataConfig()
    texts = ["The for statement iterates.", "x = 1"]
    docs = tokenize_rows({"text": texts}, tok, cfg, max_length=None)
    for d, t in zip(docs, texts):
        assert d.input_ids.dtype == np.int64 and d.labels.dtype == np.int64
        assert np.array_equal(d.input_ids, d.labels)
        assert tok.decode(d.input_ids) == t
        assert d.advantage == 1.0


def test_prompt_completion_labels_only_the_completion(tok):
    cfg = DataConfig(prompt_column="prompt", completion_column="completion")
    # The completion text also appears inside the prompt: the mask must pick the answer.
    rows = {
        "prompt": ["Repeat after me: a list is mutable.", "What does len() return?"],
        "completion": [" a list is mutable.", "The number of items."],
    }
    docs = tokenize_rows(rows, tok, cfg, max_length=None)
    for d, prompt, completion in zip(docs, rows["prompt"], rows["completion"]):
        runs = _labelled_runs(d)
        assert len(runs) == 1
        assert tok.decode(runs[0]) == completion
        first = int(np.flatnonzero(d.labels != IGNORE_INDEX)[0])
        assert prompt in tok.decode(d.input_ids[:first])  # the prompt is all masked
        assert np.all(d.labels[d.labels != IGNORE_INDEX] == d.input_ids[d.labels != IGNORE_INDEX])
        # Same token ids as the tokenizer's own chat tokenization (no extra specials).
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        ref = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)
        assert d.input_ids.tolist() == ref["input_ids"]


def test_conversation_masks_non_assistant_turns(tok):
    convo = [
        {"role": "system", "content": "You answer questions about Python."},
        {"role": "user", "content": "Name a mutable type."},
        {"role": "assistant", "content": "list"},
        {"role": "user", "content": "And an immutable one?"},
        {"role": "assistant", "content": "tuple, for example."},
    ]
    cfg = DataConfig(conversation_column="messages")
    (d,) = tokenize_rows({"messages": [convo]}, tok, cfg, max_length=None)
    runs = _labelled_runs(d)
    assert [tok.decode(r) for r in runs] == ["list", "tuple, for example."]
    masked_text = tok.decode(d.input_ids[d.labels == IGNORE_INDEX])
    for m in convo:
        if m["role"] != "assistant":
            assert m["content"] in masked_text


def test_chat_rows_have_no_doubled_bos(tok):
    from tokenizers.processors import TemplateProcessing

    bos_tok = load_tiny_tokenizer()
    bos = bos_tok.bos_token_id
    bos_tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos_tok.bos_token} $A", special_tokens=[(bos_tok.bos_token, bos)]
    )
    bos_tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    assert bos_tok("hi")["input_ids"][0] == bos  # this tokenizer adds BOS to plain text
    cfg = DataConfig(prompt_column="p", completion_column="c")
    (d,) = tokenize_rows({"p": ["hi"], "c": ["there"]}, bos_tok, cfg, max_length=None)
    assert d.input_ids[0] == bos and d.input_ids[1] != bos
    assert tok.decode(_labelled_runs(d)[0]) == "there"


def test_truncation_cuts_or_rejects_with_row_name(tok):
    text = " ".join(["token"] * 50)
    full = tokenize_rows({"text": [text]}, tok, DataConfig(), max_length=None)[0]
    assert len(full) > 10
    cut = tokenize_rows({"text": [text]}, tok, DataConfig(truncation=True), max_length=10)[0]
    assert len(cut) == 10 and np.array_equal(cut.input_ids, full.input_ids[:10])
    assert np.array_equal(cut.labels, full.labels[:10])
    with pytest.raises(BadInputError, match=r"row 17 has \d+ tokens.*10"):
        tokenize_rows({"text": [text]}, tok, DataConfig(), max_length=10, row_ids=[17])
    short = tokenize_rows({"text": ["x"]}, tok, DataConfig(), max_length=10)[0]
    assert len(short) == 1


def test_empty_text_is_not_an_error(tok):
    (d,) = tokenize_rows({"text": [""]}, tok, DataConfig(), max_length=8)
    assert len(d) == 0 and len(d.labels) == 0


def test_bad_cells_name_the_row(tok):
    with pytest.raises(BadInputError, match="row 3.*'text'"):
        tokenize_rows({"text": [12]}, tok, DataConfig(), max_length=None, row_ids=[3])
    with pytest.raises(BadInputError, match="role"):
        tokenize_rows(
            {"m": [[{"content": "no role"}]]}, tok, DataConfig(conversation_column="m"), None
        )


def test_advantage_column_sets_doc_advantage(tok):
    rows = {"text": ["a b", "c d"], "advantage": [0.25, -1.5]}
    docs = tokenize_rows(rows, tok, DataConfig(), max_length=None)
    assert [d.advantage for d in docs] == [0.25, -1.5]


# ----------------------------------------------------------------------------- advantages


def test_advantages_are_reward_minus_group_mean():
    rng = np.random.default_rng(0)
    prompts = [f"p{int(k)}" for k in rng.integers(0, 5, size=40)]
    rewards = rng.normal(size=40).tolist()
    adv = estimate_advantages(prompts, rewards, skip_nan=False)
    for i, p in enumerate(prompts):
        group = [r for q, r in zip(prompts, rewards) if q == p]
        assert adv[i] == pytest.approx(rewards[i] - sum(group) / len(group))
    for p in set(prompts):
        assert sum(a for q, a in zip(prompts, adv) if q == p) == pytest.approx(0.0, abs=1e-12)


def test_advantages_group_unhashable_prompts():
    prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "a"}], ["b"]]
    adv = estimate_advantages(prompts, [1.0, 3.0, 5.0], skip_nan=False)
    assert adv.tolist() == [-1.0, 1.0, 0.0]


def test_nan_rewards_raise_or_are_skipped():
    with pytest.raises(BadInputError, match="NaN"):
        estimate_advantages(["a", "a"], [1.0, float("nan")], skip_nan=False)
    adv = estimate_advantages(["a", "a", "a"], [1.0, float("nan"), 3.0], skip_nan=True)
    assert np.isnan(adv[1])
    assert adv[0] == -1.0 and adv[2] == 1.0  # NaN row left out of the mean


# ----------------------------------------------------------------------------- loading


def test_parse_kv():
    assert parse_kv("a=1,b=2.5,c=true,d=x|y,e=hello, f = None", "--data_kwargs") == {
        "a": 1,
        "b": 2.5,
        "c": True,
        "d": ["x", "y"],
        "e": "hello",
        "f": None,
    }
    assert parse_kv("", "--data_kwargs") == {}
    with pytest.raises(BadInputError, match="--data_kwargs"):
        parse_kv("novalue", "--data_kwargs")


def test_missing_column_error_names_column_and_available():
    with pytest.raises(BadInputError) as e:
        check_columns(["text", "id"], DataConfig(prompt_column="question"))
    assert "'question'" in str(e.value) and "'text'" in str(e.value) and "'id'" in str(e.value)
    with pytest.raises(BadInputError, match="'answer'"):
        check_columns(["q"], DataConfig(prompt_column="q", completion_column="answer"))
    with pytest.raises(BadInputError, match="'score'"):
        check_columns(["text"], DataConfig(reward_column="score"))
    with pytest.raises(BadInputError, match="'chat'"):
        check_columns(["text"], DataConfig(conversation_column="chat"))
    check_columns(["chat"], DataConfig(conversation_column="chat"))  # prompt col not needed


@pytest.fixture(scope="module")
def small_rows(tiny_assets):
    corpus = datasets.load_from_disk(str(tiny_assets.corpus_dir))
    texts = list(corpus[:30]["text"])
    return {"text": texts, "n": list(range(100, 130))}


@pytest.fixture(scope="module")
def formats(small_rows, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    ds = datasets.Dataset.from_dict(small_rows)
    with open(root / "rows.jsonl", "w") as f:
        for t, n in zip(small_rows["text"], small_rows["n"]):
            f.write(json.dumps({"text": t, "n": n}) + "\n")
    ds.to_parquet(str(root / "rows.parquet"))
    ds.to_csv(str(root / "rows.csv"), index=False)
    ds.select(range(15)).to_parquet(str(root / "part-0.parquet"))
    ds.select(range(15, 30)).to_parquet(str(root / "part-1.parquet"))
    (root / "folder").mkdir()
    ds.select(range(15)).to_json(str(root / "folder" / "train-0.jsonl"))
    ds.select(range(15, 30)).to_json(str(root / "folder" / "train-1.jsonl"))
    ds.save_to_disk(str(root / "disk"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(
        str(root / "dict")
    )
    return root


@pytest.mark.parametrize(
    "name",
    ["rows.jsonl", "rows.parquet", "rows.csv", "part-*.parquet", "folder", "disk", "dict"],
)
def test_all_sources_give_the_same_rows(formats, small_rows, name):
    cfg = DataConfig(dataset=str(formats / name), data_kwargs=f"cache_dir={formats / 'hf'}")
    ds = load_dataset_rows(cfg)
    assert list(ds["text"]) == small_rows["text"]
    assert list(ds["n"]) == small_rows["n"]
    assert ds.cache_files, "rows are memory-mapped from Arrow files, not held in RAM"
    sliced = load_dataset_rows(
        DataConfig(dataset=cfg.dataset, split="train[5:12]", data_kwargs=cfg.data_kwargs)
    )
    assert list(sliced["n"]) == small_rows["n"][5:12]


def test_dataset_dict_split_selection(formats, small_rows):
    ds = load_dataset_rows(DataConfig(dataset=str(formats / "dict"), split="test"))
    assert list(ds["n"]) == small_rows["n"][:5]
    mixed = load_dataset_rows(
        DataConfig(dataset=str(formats / "dict"), split="test[:2]+train[-3:]")
    )
    assert list(mixed["n"]) == small_rows["n"][:2] + small_rows["n"][-3:]
    with pytest.raises(BadInputError, match="'validation'.*'test', 'train'"):
        load_dataset_rows(DataConfig(dataset=str(formats / "dict"), split="validation"))


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.parquet", "disk"])
def test_a_split_that_does_not_exist_is_an_error(formats, name):
    """A one-split source (files, a saved Dataset) has only 'train': ``--split nonexistent``
    must not silently read all of it."""
    cfg = DataConfig(dataset=str(formats / name), split="nonexistent[:3]",
                     data_kwargs=f"cache_dir={formats / 'hf'}")
    with pytest.raises(BadInputError, match="'nonexistent' not found.*one split, 'train'"):
        load_dataset_rows(cfg)


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty.jsonl", b"", "is empty"),
        ("binary.jsonl", b"\x00\x01\x02\xff\xfe", "could not read .* as json"),
        ("ragged.csv", b"a,b\n1,2\n3,4,5\n", "could not read .* as csv.*same columns"),
        ("blank.jsonl", b"\n", "could not read|has no rows"),
    ],
)
def test_unreadable_files_are_one_sentence(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BadInputError, match=match) as info:
        load_dataset_rows(DataConfig(dataset=str(tmp_path / name),
                                     data_kwargs=f"cache_dir={tmp_path / 'hf'}"))
    assert "\n" not in str(info.value)


def test_a_dataset_without_rows_is_refused(tmp_path):
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "none"))
    with pytest.raises(BadInputError, match="has no rows|is it empty or damaged"):
        load_dataset_rows(DataConfig(dataset=str(tmp_path / "none")))


def test_tiny_dataset_resolves(tiny_assets):
    ds = load_dataset_rows(DataConfig())
    assert len(ds) == len(datasets.load_from_disk(str(tiny_assets.corpus_dir)))
    assert ds.column_names == ["text"]


def test_missing_local_paths_are_clear_errors(tmp_path):
    for name in [str(tmp_path / "nope"), str(tmp_path / "nope.jsonl"), str(tmp_path / "*.csv")]:
        with pytest.raises(BadInputError, match="does not exist"):
            load_dataset_rows(DataConfig(dataset=name))


def test_unreachable_hub_id_is_a_clear_error():
    # conftest sets HF_HUB_OFFLINE=1, so this must fail fast without network access.
    with pytest.raises(BadInputError, match="no-such-org/no-such-dataset"):
        load_dataset_rows(DataConfig(dataset="no-such-org/no-such-dataset"))


def test_row_source_pickles_without_data_and_reads_rows(tmp_path):
    ds = datasets.Dataset.from_dict(
        {
            "prompt": ["a", "a", "b", "b", "b"],
            "completion": ["x", "y", "z", "w", "v"],
            "reward": [1.0, 0.0, 2.0, 4.0, 0.0],
            "extra": [0, 1, 2, 3, 4],
        }
    )
    ds.save_to_disk(str(tmp_path / "d"))
    cfg = DataConfig(
        dataset=str(tmp_path / "d"),
        prompt_column="prompt",
        completion_column="completion",
        reward_column="reward",
    )
    assert "advantage" not in DatasetRows(cfg).rows(np.array([0]))  # opt-in only
    src = DatasetRows(cfg, with_advantages=True)
    assert len(src) == 5
    clone = pickle.loads(pickle.dumps(src))
    assert clone._ds is None  # only the config travels
    rows = clone.rows(np.array([4, 0, 2]))
    assert rows["completion"] == ["v", "x", "z"]
    assert "extra" not in rows  # unused columns are not read
    assert rows["advantage"] == pytest.approx([0.0 - 2.0, 1.0 - 0.5, 2.0 - 2.0])


def test_row_source_reports_missing_columns(tmp_path):
    datasets.Dataset.from_dict({"body": ["a"]}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(BadInputError, match="'text'.*'body'"):
        len(DatasetRows(DataConfig(dataset=str(tmp_path / "d"))))
