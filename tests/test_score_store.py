"""Score store: bergson's structured layout, written flags, resume, exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from bergson_ray.errors import BadInputError, StoreError
from bergson_ray.store.score_layout import score_layout
from bergson_ray.store.score_store import ScoreStore
from bergson_ray.store.score_writer import ScoreWriter
from bergson_ray.store.topk import write_topk_parquet


@pytest.mark.parametrize(
    ("num_scores", "dtype", "itemsize", "offsets"),
    [
        (1, "float32", 8, [0, 4]),
        (3, "float32", 24, [0, 4, 8, 12, 16, 20]),
        (3, "float16", 16, [0, 2, 4, 6, 8, 10]),
        (3, "bfloat16", 16, [0, 2, 4, 6, 8, 10]),
        (2, "float32", 16, [0, 4, 8, 12]),
        (1, "float16", 8, [0, 2]),
    ],
)
def test_layout_matches_spec_examples(num_scores, dtype, itemsize, offsets):
    layout = score_layout(num_scores, dtype)
    assert layout["itemsize"] == itemsize
    assert layout["offsets"] == offsets
    assert layout["names"][:2] == ["score_0", "written_0"]
    assert layout["formats"][:2] == [dtype, "bool"]


def test_info_json_exactly_as_bergson(tmp_path):
    ScoreWriter(tmp_path, num_rows=5, num_scores=2).close()
    info = json.loads((tmp_path / "info.json").read_text())
    assert info == {
        "attribute_tokens": False,
        "num_items": 5,
        "num_rows": 5,
        "num_scores": 2,
        "dtype": {
            "names": ["score_0", "written_0", "score_1", "written_1"],
            "formats": ["float32", "bool", "float32", "bool"],
            "offsets": [0, 4, 8, 12],
            "itemsize": 16,
        },
    }
    assert (tmp_path / "scores.bin").stat().st_size == 5 * 16


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_roundtrip_and_byte_positions(tmp_path, dtype):
    scores = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with ScoreWriter(tmp_path, 4, 3, dtype) as w:
        w.write([2, 0], scores[[2, 0]])
        w.write(np.array([1, 3]), scores[[1, 3]].numpy())
    store = ScoreStore.open(tmp_path)
    td = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    expected = scores.to(td).float().numpy()
    np.testing.assert_array_equal(store.scores, expected)
    assert store.written.all() and store.is_complete() and store.dtype == td

    # byte-level: row 1, column 2 lives at 1*itemsize + 2*A; its flag right after
    raw = (tmp_path / "scores.bin").read_bytes()
    itemsize = score_layout(3, dtype)["itemsize"]
    a = 8 if dtype == "float32" else 4
    width = 4 if dtype == "float32" else 2
    pos = 1 * itemsize + 2 * a
    cell = scores[1, 2].to(td).reshape(1)
    ref = cell.view(torch.int16 if width == 2 else torch.int32).numpy().tobytes()
    assert raw[pos : pos + width] == ref
    assert raw[pos + width] == 1


def test_written_flags_partial_and_resume(tmp_path):
    w = ScoreWriter(tmp_path, 5, 2)
    w.write([0, 3], torch.ones(2, 2))
    w.write([1], torch.full((1, 1), 7.0), query_offset=1)  # only column 1 of row 1
    w.close()
    store = ScoreStore.open(tmp_path)
    np.testing.assert_array_equal(store.written, [[1, 1], [0, 1], [0, 0], [1, 1], [0, 0]])
    np.testing.assert_array_equal(store.missing_rows(), [1, 2, 4])
    assert not store.is_complete()

    before = (tmp_path / "scores.bin").stat().st_ino
    w = ScoreWriter.reopen(tmp_path)
    assert (tmp_path / "scores.bin").stat().st_ino == before  # never recreated
    np.testing.assert_array_equal(w.missing_rows(), [1, 2, 4])
    w.write([1, 2, 4], torch.arange(6.0).reshape(3, 2))
    assert w.is_complete()
    w.close()
    store = ScoreStore.open(tmp_path)
    np.testing.assert_array_equal(store.scores[3], [1, 1])
    np.testing.assert_array_equal(store.scores[1], [0, 1])
    with pytest.raises(StoreError, match="reopen"):
        ScoreWriter(tmp_path, 5, 2)


def test_write_rejects_bad_shapes(tmp_path):
    w = ScoreWriter(tmp_path, 3, 2)
    with pytest.raises(BadInputError, match="exceed"):
        w.write([0], torch.zeros(1, 3))
    with pytest.raises(BadInputError, match="out of range"):
        w.write([3], torch.zeros(1, 2))
    with pytest.raises(BadInputError, match="2 row indices"):
        w.write([0, 1], torch.zeros(1, 2))
    with pytest.raises(BadInputError, match="float64"):
        score_layout(1, "float64")


def test_per_token_scores(tmp_path):
    offsets = np.array([0, 2, 2, 5])
    # numpy integers as sizes (offsets[-1]) must still give a JSON info.json
    with ScoreWriter(
        tmp_path, offsets[-1], np.int64(1), attribute_tokens=True, offsets=offsets
    ) as w:
        w.write_items([2, 0], torch.tensor([[3.0], [4.0], [5.0], [1.0], [2.0]]))
    store = ScoreStore.open(tmp_path)
    assert store.attribute_tokens and store.num_items == 3
    np.testing.assert_array_equal(store.offsets, offsets)
    np.testing.assert_array_equal(store.scores[:, 0], [1, 2, 3, 4, 5])
    df = store.to_pandas()
    assert list(df.columns) == ["score_0", "row", "item"]
    assert df["item"].tolist() == [0, 0, 2, 2, 2]


def test_corrupt_score_store(tmp_path):
    ScoreWriter(tmp_path, 4, 1).close()
    with open(tmp_path / "scores.bin", "r+b") as f:
        f.truncate(20)
    with pytest.raises(StoreError, match=r"scores.bin is 20 bytes \(truncated\).*32 bytes"):
        ScoreStore.open(tmp_path)
    (tmp_path / "info.json").unlink()
    with pytest.raises(StoreError, match="info.json is missing"):
        ScoreStore.open(tmp_path)


def test_exports_and_sign_convention(tmp_path):
    with ScoreWriter(tmp_path, 3, 2) as w:
        w.write([0, 1, 2], torch.tensor([[1.0, -1.0], [2.0, -2.0], [3.0, -3.0]]))
    store = ScoreStore.open(tmp_path)
    assert store.higher_is_better is None
    np.testing.assert_array_equal(store.loss_signed(), store.scores)
    table = store.to_arrow()
    assert table.column_names == ["score_0", "score_1", "row"]
    assert table.column("row").to_pylist() == [0, 1, 2]

    doc = {"steps": [{"score": {"score_cfg": {"higher_is_better": True}}}], "metadata": {}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    store = ScoreStore.open(tmp_path)
    assert store.higher_is_better is True
    np.testing.assert_array_equal(store.loss_signed(), -store.scores)
    doc["steps"][0]["score"]["score_cfg"]["higher_is_better"] = False
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    assert ScoreStore.open(tmp_path).higher_is_better is False


def test_candidates_become_row_ids(tmp_path):
    with ScoreWriter(tmp_path, 2, 1) as w:
        w.write([0, 1], torch.tensor([[0.5], [0.25]]))
    np.save(tmp_path / "candidates.npy", np.array([10, 42]))
    assert ScoreStore.open(tmp_path).to_pandas()["row"].tolist() == [10, 42]


def test_topk_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    scores = np.array([[0.1, 5.0], [0.9, np.nan], [0.5, -1.0], [0.9, 2.0]], dtype=np.float32)
    texts = ["a", "b", "c", "d"]
    path = write_topk_parquet(tmp_path / "top.parquet", scores, k=2, bottom_k=1, texts=texts)
    df = pq.read_table(path).to_pandas()
    assert list(df.columns) == ["query", "rank", "direction", "row", "score", "text"]
    q0 = df[df["query"] == 0]
    # ties (rows 1 and 3 both 0.9) broken by row index
    assert q0[q0.direction == "top"][["rank", "row", "text"]].values.tolist() == [
        [1, 1, "b"],
        [2, 3, "d"],
    ]
    assert q0[q0.direction == "bottom"]["row"].tolist() == [0]
    q1 = df[df["query"] == 1]
    assert q1[q1.direction == "top"]["row"].tolist() == [0, 3]  # NaN never ranked
    assert q1[q1.direction == "bottom"]["score"].tolist() == [-1.0]

    big = np.random.default_rng(0).standard_normal((1000, 3)).astype(np.float32)
    df = pq.read_table(write_topk_parquet(tmp_path / "b.parquet", big, k=5)).to_pandas()
    for q in range(3):
        expect = np.argsort(-big[:, q], kind="stable")[:5]
        assert df[df["query"] == q]["row"].tolist() == expect.tolist()
    assert (df["text"] == "").all()
