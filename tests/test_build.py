"""``build`` on Ray: the store equals in-process gradients and ignores how work was split."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_BUILD, TINY_SPLIT, assert_same, rows_of, summary_of, tiny_runner_spec

from bergson_ray.errors import BadInputError, RunExistsError
from bergson_ray.pipelines.build import build
from bergson_ray.runners.gradient_runner import GradientRunner
from bergson_ray.store.gradient_store import GradientStore
from bergson_ray.testing.faults import FaultPlan

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_session, tiny_assets):
    """One worker, large token budget."""
    out = tmp_path_factory.mktemp("ref") / "idx"
    return build(
        run_path=out,
        **TINY_BUILD,
        token_batch_size=4096,
        num_workers=1,
    )


def test_store_layout_and_metadata(reference):
    info = json.loads((reference / "info.json").read_text())
    assert info["num_items"] == info["num_grads"] == 40
    assert info["base_dtype"] == "float32" and not info["attribute_tokens"]
    assert all(v == 64 for v in info["grad_sizes"].values())
    assert (reference / "gradients.bin").stat().st_size == 40 * sum(info["grad_sizes"].values()) * 4
    assert not Path(str(reference) + ".part").exists()
    store = GradientStore.open(reference)
    assert len(store.data) == 40 and {"length", "loss", "text"} <= set(store.data.column_names)
    assert np.all(np.asarray(store.data["loss"]) > 0)


def test_store_equals_in_process_engine(reference):
    out = GradientRunner(tiny_runner_spec()).gradients(np.array([0, 7, 39]))
    want = out["grads"]
    got = rows_of(reference)[[0, 7, 39]]
    assert_same(got, want)


@pytest.mark.parametrize("per_token", [False, True])
def test_rows_streamed_batch_by_batch_equal_the_window_buffer(tmp_path, tiny_assets, per_token):
    """``build``'s workers hand each packed batch's rows to the store as they are made
    (``gradients(idx, sink=...)``): every document reaches the sink once, with the rows
    the window-buffer path gives; per document, those too short for a gradient as
    explicit zeros (a re-used store may hold old bytes there); per token, their counts."""
    import dataclasses

    import datasets

    data = tmp_path / "docs.jsonl"
    texts = ["a perfectly normal sentence about loops", "", "x", "two words", "y" * 40]
    datasets.Dataset.from_list([{"text": t} for t in texts]).to_json(str(data))
    spec = tiny_runner_spec(token_batch_size=24, attribute_tokens=per_token)
    spec = dataclasses.replace(
        spec, skip_short_docs=True, data=dataclasses.replace(spec.data, dataset=str(data), split="train")
    )
    runner = GradientRunner(spec)
    idx = np.array([4, 1, 0, 2, 3])
    want = runner.gradients(idx)
    got: dict[int, np.ndarray] = {}
    calls = []

    def sink(pos, rows, counts):
        assert (counts is not None) == per_token
        counts = np.ones(len(pos), dtype=int) if counts is None else counts
        assert len(rows) == counts.sum()
        for j, a, b in zip(pos.tolist(), np.cumsum(counts) - counts, np.cumsum(counts)):
            assert j not in got, f"document {j} written twice"
            got[j] = rows[a:b]
        calls.append(len(pos))

    out = runner.gradients(idx, sink=sink)
    assert "grads" not in out and len(calls) >= 2, calls  # more than one packed batch
    np.testing.assert_array_equal(out["loss"], want["loss"])
    dim = runner.engine.dim
    for j in range(len(idx)):
        expected = np.asarray(want["grads"][j]).reshape(-1, dim)
        if per_token:  # short documents have no token rows: nothing to write
            np.testing.assert_array_equal(got.get(j, np.zeros((0, dim))), expected)
            assert expected.shape[0] == out["token_count"][j]
        else:
            np.testing.assert_array_equal(got[j], expected)
    if not per_token:
        assert not got[1].any() and not got[3].any() and all(got[j].any() for j in (0, 2, 4))


def test_two_workers_and_small_token_budget_give_the_same_store(reference, tmp_path):
    other = build(
        run_path=tmp_path / "idx",
        **TINY_BUILD,
        token_batch_size=256,
        num_workers=2,
        window_size=8,
    )
    assert_same(rows_of(other), rows_of(reference))


def test_killed_worker_loses_and_duplicates_nothing(reference, tmp_path):
    marker = tmp_path / "crashed"
    out = build(
        run_path=tmp_path / "idx",
        **TINY_BUILD,
        token_batch_size=4096,
        num_workers=1,
        window_size=8,
        faults=FaultPlan(crash_worker_after_batches=2, crash_marker=str(marker)),
    )
    assert marker.exists(), "the worker never crashed: the test proved nothing"
    assert_same(rows_of(out), rows_of(reference))
    store = GradientStore.open(out)
    assert len(store.data) == 40
    s = summary_of(out)  # the restarted actor is a new worker in the driver's accounting
    assert s["workers_seen"] == 2 and sum(s["rows_per_worker_min_max"]) == s["rows_received"]


def test_resume_recomputes_only_missing_rows(reference, tmp_path):
    import shutil

    part = tmp_path / "idx.part"
    shutil.copytree(reference, part)
    shutil.rmtree(part / "data.hf")
    (part / "summary.json").unlink()
    # pretend rows 5..14 were never written
    written = np.memmap(part / "written.bin", dtype=np.uint8, mode="r+")
    written[5:15] = 0
    written.flush()
    raw = np.memmap(part / "gradients.bin", dtype=np.float32, mode="r+").reshape(40, -1)
    raw[5:15] = 0
    raw.flush()
    (part / "progress").mkdir(exist_ok=True)
    out = build(
        run_path=tmp_path / "idx",
        **TINY_BUILD,
        token_batch_size=4096,
        num_workers=1,
        resume=True,
        executor="process",  # a Ray run resumed in process: the same rows
    )
    assert_same(rows_of(out), rows_of(reference))
    assert summary_of(out)["computed_documents"] == 10


@pytest.mark.parametrize(
    "change,named",
    [
        ({"projection_type": "normal"}, "--projection_type: started with 'rademacher', now 'normal'"),
        ({"split": "train[:41]"}, "--split"),
        ({"token_batch_size": 2048}, "--token_batch_size"),
    ],
)
def test_resume_with_other_settings_is_refused(reference, tmp_path, change, named):
    """A resumed run never mixes rows of two settings: the difference is named, and the
    unfinished run is left as it was (still resumable with the right settings)."""
    import shutil

    from bergson_ray.errors import BadInputError

    part = tmp_path / "idx.part"
    shutil.copytree(reference, part)
    before = (part / "gradients.bin").read_bytes()
    settings = {**TINY_BUILD, "token_batch_size": 4096, "num_workers": 1, **change}
    with pytest.raises(BadInputError, match=re.escape(named)):
        build(run_path=tmp_path / "idx", resume=True, **settings)
    assert (part / "gradients.bin").read_bytes() == before
    assert not (tmp_path / "idx").exists()


def test_per_token_store_sums_to_sequence_rows(reference, tmp_path):
    out = build(
        run_path=tmp_path / "tok",
        dataset="tiny",
        split="train[:6]",
        projection_dim=8,
        truncation=True,
        attribute_tokens=True,
        num_workers=1,
        executor="process",
    )
    store = GradientStore.open(out)
    assert store.attribute_tokens and store.num_items == 6
    lengths = np.asarray(store.data["length"])
    np.testing.assert_array_equal(np.diff(store.offsets), np.maximum(lengths - 1, 0))
    seq = rows_of(reference)[:6]
    tok = store.rows(np.arange(store.num_grads)).numpy()
    for i in range(6):
        lo, hi = store.offsets[i], store.offsets[i + 1]
        assert_same(tok[lo:hi].sum(0), seq[i], tol=1e-5)


def test_bf16_store_roundtrips(tmp_path, ray_session):
    out = build(
        run_path=tmp_path / "bf",
        dataset="tiny",
        split="train[:4]",
        projection_dim=4,
        truncation=True,
        precision="bf16",
        num_workers=1,
        executor="process",
    )
    store = GradientStore.open(out)
    assert store.dtype == torch.bfloat16
    assert np.isfinite(store.rows(np.arange(4)).numpy()).all()


# --- bad input: clear errors, nothing that looks like a finished store ------------------
def no_store(path: Path) -> bool:
    return not path.exists()


def test_missing_column_is_named(tmp_path, tiny_assets):
    with pytest.raises(BadInputError, match="nope"):
        build(run_path=tmp_path / "x", dataset="tiny", prompt_column="nope", projection_dim=4)
    assert no_store(tmp_path / "x")


def test_unknown_module_glob(tmp_path, tiny_assets):
    with pytest.raises(BadInputError, match="matches no module"):
        build(
            run_path=tmp_path / "x",
            dataset="tiny",
            filter_modules="nothing.like.this",
            projection_dim=4,
        )
    assert no_store(tmp_path / "x")


def test_missing_model_path(tmp_path, tiny_assets):
    with pytest.raises(BadInputError, match="does not exist"):
        build(run_path=tmp_path / "x", model=str(tmp_path / "no-model"), dataset="tiny")
    assert no_store(tmp_path / "x")


def test_existing_run_needs_overwrite(reference):
    with pytest.raises(RunExistsError):
        build(run_path=reference, dataset="tiny", split=TINY_SPLIT, projection_dim=8)
    assert (reference / "info.json").exists()  # untouched


def test_short_documents_fail_clearly(tmp_path, ray_session, tiny_assets):
    import datasets

    data = tmp_path / "docs.jsonl"
    rows = [{"text": "a perfectly normal sentence about loops"}, {"text": ""}, {"text": "x"}]
    datasets.Dataset.from_list(rows).to_json(str(data))
    with pytest.raises(BadInputError, match="fewer than 2 tokens"):
        build(run_path=tmp_path / "x", dataset=str(data), projection_dim=4, num_workers=1,
              executor="ray")
    assert no_store(tmp_path / "x")
    # bergson's behaviour on request: zero rows for the short documents
    out = build(
        run_path=tmp_path / "y",
        dataset=str(data),
        projection_dim=4,
        num_workers=1,
        skip_short_docs=True,
        executor="process",  # the refusal above came through Ray's error column
    )
    r = rows_of(out)
    assert np.abs(r[0]).sum() > 0 and np.abs(r[1]).sum() == 0 and np.abs(r[2]).sum() == 0
    assert os.path.exists(out / "data.hf")
