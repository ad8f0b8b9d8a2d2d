"""Gradient store, run directory and processor files: formats, resume, corruption."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import yaml

from bergson_ray.errors import BadInputError, RunExistsError, StoreError
from bergson_ray.store.elements import element_type
from bergson_ray.store.files import offsets_from_counts
from bergson_ray.store.gradient_store import GradientStore
from bergson_ray.store.gradient_writer import GradientStoreWriter
from bergson_ray.store.processor import (
    NormalizerState,
    ProcessorConfig,
    load_hessians,
    load_hessians_eigen,
    load_normalizers,
    load_processor,
    read_total_processed,
    save_processor,
    write_total_processed,
)
from bergson_ray.store.run_dir import RunDir, read_run_config

SIZES = OrderedDict([("layers.0.attn", 6), ("layers.0.mlp", 4), ("embed_out", 3)])
DIM = sum(SIZES.values())
DTYPES = ["float32", "float16", "bfloat16", "float64"]


def _rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------- gradient store


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_every_dtype_matches_bytes_and_values(tmp_path, dtype):
    et = element_type(dtype)
    rows = _rows(7)
    with GradientStoreWriter(tmp_path, num_items=7, grad_sizes=SIZES, dtype=dtype) as w:
        # out of order, in two batches: rows land at their own index
        w.write_rows(np.array([6, 0, 3]), rows[[6, 0, 3]])
        w.write_rows([1, 2, 4, 5], rows[[1, 2, 4, 5]].numpy())
        assert w.is_complete()

    store = GradientStore.open(tmp_path)
    expected = rows.to(et.torch_dtype)
    assert store.dtype == et.torch_dtype
    assert (store.num_items, store.num_grads, store.total_dim) == (7, 7, DIM)
    assert list(store.grad_sizes.items()) == list(SIZES.items())
    torch.testing.assert_close(store.rows(slice(None)), expected.float(), rtol=0, atol=0)

    # the file is exactly the little-endian C-order matrix, no header
    raw = (tmp_path / "gradients.bin").read_bytes()
    if et.is_bf16:
        ref = expected.view(torch.int16).numpy().astype("<i2").tobytes()
    else:
        ref = expected.numpy().astype(et.storage).tobytes()
    assert raw == ref
    info = json.loads((tmp_path / "info.json").read_text())
    assert list(info) == ["attribute_tokens", "num_items", "num_grads", "grad_sizes", "base_dtype"]
    assert info["base_dtype"] == dtype and info["attribute_tokens"] is False
    assert list(info["grad_sizes"]) == list(SIZES)


def test_module_views_and_chunks(tmp_path):
    rows = _rows(10, seed=1)
    with GradientStoreWriter(tmp_path, num_items=10, grad_sizes=SIZES) as w:
        w.write_rows(np.arange(10), rows)
    store = GradientStore.open(tmp_path)
    view = store.module("layers.0.mlp")
    assert isinstance(view, np.memmap) and view.shape == (10, 4)
    np.testing.assert_array_equal(view, rows[:, 6:10].numpy())
    assert not view.flags.writeable
    both = store.modules(["embed_out", "layers.0.attn"], rows=[2, 5])
    torch.testing.assert_close(both, torch.cat([rows[[2, 5], 10:], rows[[2, 5], :6]], 1))
    chunks = list(store.iter_chunks(4))
    assert [(c.start, c.stop) for c in chunks] == [(0, 4), (4, 8), (8, 10)]
    torch.testing.assert_close(torch.cat([c.rows for c in chunks]), rows)
    assert [c.rows.shape[1] for c in store.iter_chunks(4, modules=["embed_out"])] == [3, 3, 3]
    with pytest.raises(BadInputError, match="not in store"):
        store.module("nope")
    # rows() returns copies: editing them never touches the file
    r = store.rows([0])
    r += 1
    torch.testing.assert_close(store.rows([0]), rows[[0]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_per_token_offsets(tmp_path, dtype):
    counts = np.array([3, 0, 2, 4])
    offsets = offsets_from_counts(counts)
    per_item = [_rows(int(c), seed=i) for i, c in enumerate(counts)]
    sizes = {k: np.int64(v) for k, v in SIZES.items()}  # numpy ints must not reach info.json
    with GradientStoreWriter(
        tmp_path, num_items=np.int64(4), grad_sizes=sizes, dtype=dtype, attribute_tokens=True,
        offsets=offsets,
    ) as w:  # fmt: skip
        w.write_items([3, 0], torch.cat([per_item[3], per_item[0]]), [4, 3])
        w.write_items([2, 1], torch.cat([per_item[2], per_item[1]]), [2, 0])
        with pytest.raises(BadInputError, match="item 2 has 3 token rows"):
            w.write_items([2], _rows(3), [3])
        with pytest.raises(BadInputError, match="per-token"):
            w.write_rows([0], _rows(1))
    store = GradientStore.open(tmp_path)
    assert store.attribute_tokens and store.num_items == 4 and store.num_grads == 9
    np.testing.assert_array_equal(store.offsets, [0, 3, 3, 5, 9])
    np.testing.assert_array_equal(np.load(tmp_path / "offsets.npy"), [0, 3, 3, 5, 9])
    td = element_type(dtype).torch_dtype
    for i in range(4):
        torch.testing.assert_close(store.item_rows(i), per_item[i].to(td).float())


def test_written_flags_and_resume(tmp_path):
    rows = _rows(6)
    w = GradientStoreWriter(tmp_path, num_items=6, grad_sizes=SIZES)
    w.write_rows([1, 4], rows[[1, 4]])
    w.mark_written([5])  # e.g. a < 2-token document keeps its zero row
    w.close()
    assert (tmp_path / "written.bin").read_bytes() == bytes([0, 1, 0, 0, 1, 1])

    w = GradientStoreWriter.reopen(tmp_path)
    np.testing.assert_array_equal(w.missing_items(), [0, 2, 3])
    w.write_rows([0, 2, 3, 1], rows[[0, 2, 3, 1]])  # item 1 again: harmless
    assert w.missing_items().size == 0
    w.close()
    store = GradientStore.open(tmp_path)
    expected = rows.clone()
    expected[5] = 0
    torch.testing.assert_close(store.rows(slice(None)), expected)
    assert store.written is not None and store.written.all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_worker_row_sinks_write_exactly_the_writers_bytes(tmp_path, dtype):
    """Workers write rows themselves (``RowSink``, pwrite): two sinks filling disjoint,
    interleaved, unsorted rows of one store give byte for byte the store the writer
    alone produces, and bf16 rows shipped as uint16 bit patterns land unchanged."""
    from bergson_ray.store.row_sink import RowSink

    rows = _rows(7)
    ref = GradientStoreWriter(tmp_path / "ref", num_items=7, grad_sizes=SIZES, dtype=dtype)
    ref.write_rows(np.arange(7), rows)
    ref.close()
    w = GradientStoreWriter(tmp_path / "w", num_items=7, grad_sizes=SIZES, dtype=dtype)
    a, b = RowSink(tmp_path / "w"), RowSink(tmp_path / "w")  # two workers
    a.write_rows([5, 0, 2], rows[[5, 0, 2]])
    bits = element_type(dtype).storage
    shipped = rows[[3, 1, 6, 4]].to(element_type(dtype).torch_dtype)
    if dtype == "bfloat16":  # how a worker's bf16 rows come out of numpy_rows
        shipped = shipped.view(torch.int16).numpy().view(bits)
    b.write_rows([3, 1, 6, 4], shipped)
    a.sync(), b.sync(), a.close(), b.close()
    assert w.missing_items().size == 7  # the driver alone flags rows written
    w.mark_written(np.arange(7))
    w.close()
    got, want = (p / "gradients.bin" for p in (tmp_path / "w", tmp_path / "ref"))
    assert got.read_bytes() == want.read_bytes()
    assert GradientStore.open(tmp_path / "w").written.all()
    with pytest.raises(BadInputError, match="closed"):
        a.write_rows([0], rows[[0]])


def test_row_sink_finishes_short_writes_in_any_row_order(tmp_path, monkeypatch):
    """The kernel may write fewer bytes than asked (a signal, a 2 GiB cap, NFS): a sink
    whose ``pwritev`` stops mid-row and whose ``pwrite`` writes 5 bytes a call still
    lays down the writer's exact bytes, for rows in order, reversed and interleaved."""
    import os

    from bergson_ray.store import row_sink as rs

    rows = _rows(9)
    ref = GradientStoreWriter(tmp_path / "ref", num_items=9, grad_sizes=SIZES)
    ref.write_rows(np.arange(9), rows)
    ref.close()
    real_pwrite = os.pwrite
    calls = {"pwritev": 0}

    def short_pwritev(fd, buffers, offset):  # half of the first buffer, then stop
        calls["pwritev"] += 1
        return real_pwrite(fd, bytes(buffers[0][: len(buffers[0]) // 2]), offset)

    monkeypatch.setattr(rs.os, "pwritev", short_pwritev)
    monkeypatch.setattr(rs.os, "pwrite", lambda fd, b, off: real_pwrite(fd, bytes(b[:5]), off))
    w = GradientStoreWriter(tmp_path / "w", num_items=9, grad_sizes=SIZES)
    sink = rs.RowSink(tmp_path / "w")
    for idx in ([0, 1, 2], [8, 7, 6], [5, 3, 4]):  # a run in order, reversed, interleaved
        sink.write_rows(idx, rows[idx])
    sink.close()
    w.mark_written(np.arange(9))
    w.close()
    assert calls["pwritev"] == 3  # one per run of adjacent store rows, whatever their order
    got, want = (p / "gradients.bin" for p in (tmp_path / "w", tmp_path / "ref"))
    assert got.read_bytes() == want.read_bytes()


def test_unfinished_stores_are_never_read_as_complete(tmp_path):
    """A store with unwritten rows, or any ``.part`` directory, is refused by every reader
    (score's query, serve, Attributor all open stores through ``GradientStore.open``)."""
    rows = _rows(6)
    w = GradientStoreWriter(tmp_path / "s", num_items=6, grad_sizes=SIZES)
    w.write_rows([1, 4], rows[[1, 4]])
    w.close()
    with pytest.raises(StoreError, match="incomplete: 2 of 6 rows"):
        GradientStore.open(tmp_path / "s")
    w = GradientStoreWriter.reopen(tmp_path / "s")
    w.write_rows([0, 2, 3, 5], rows[[0, 2, 3, 5]])
    w.close()
    (tmp_path / "s").rename(tmp_path / "r.part")
    with pytest.raises(StoreError, match="unfinished run"):
        GradientStore.open(tmp_path / "r.part")
    (tmp_path / "r.part").rename(tmp_path / "r")
    assert GradientStore.open(tmp_path / "r").written.all()
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "scores.bin").write_bytes(b"\0" * 8)
    (tmp_path / "scores" / "info.json").write_text("{}")
    with pytest.raises(StoreError, match="is a score store .*not a gradient store"):
        GradientStore.open(tmp_path / "scores")


def test_writer_refuses_existing_store_and_bad_input(tmp_path):
    GradientStoreWriter(tmp_path, num_items=2, grad_sizes=SIZES).close()
    with pytest.raises(StoreError, match="reopen"):
        GradientStoreWriter(tmp_path, num_items=2, grad_sizes=SIZES)
    w = GradientStoreWriter.reopen(tmp_path)
    with pytest.raises(BadInputError, match="out of range"):
        w.write_rows([2], _rows(1))
    with pytest.raises(BadInputError, match=r"expected \[1, 13\]"):
        w.write_rows([0], torch.zeros(1, 5))
    with pytest.raises(BadInputError, match="unsupported element dtype"):
        GradientStoreWriter(tmp_path / "x", num_items=1, grad_sizes=SIZES, dtype="int8")


def test_reopen_bergson_store_without_written_bitmap(tmp_path):
    GradientStoreWriter(tmp_path, num_items=3, grad_sizes=SIZES).close()
    (tmp_path / "written.bin").unlink()
    w = GradientStoreWriter.reopen(tmp_path)
    np.testing.assert_array_equal(w.missing_items(), [0, 1, 2])


def _small_store(path, n=4):
    with GradientStoreWriter(path, num_items=n, grad_sizes=SIZES) as w:
        w.write_rows(np.arange(n), _rows(n))
    return path


def test_corrupt_truncated_bin(tmp_path):
    _small_store(tmp_path)
    with open(tmp_path / "gradients.bin", "r+b") as f:
        f.truncate(4 * DIM * 4 - 10)
    with pytest.raises(StoreError, match=r"gradients.bin is 198 bytes \(truncated\).*208 bytes"):
        GradientStore.open(tmp_path)


def test_corrupt_missing_info(tmp_path):
    _small_store(tmp_path)
    (tmp_path / "info.json").unlink()
    with pytest.raises(StoreError, match="info.json is missing"):
        GradientStore.open(tmp_path)


def test_corrupt_grad_sizes_mismatch(tmp_path):
    _small_store(tmp_path)
    info = json.loads((tmp_path / "info.json").read_text())
    info["grad_sizes"]["embed_out"] = 5  # sum now 15, file holds 13 columns
    (tmp_path / "info.json").write_text(json.dumps(info))
    with pytest.raises(StoreError, match=r"sum\(grad_sizes\)=15"):
        GradientStore.open(tmp_path)


def test_corrupt_missing_offsets_and_unfinished_run(tmp_path):
    counts = [1, 2]
    with GradientStoreWriter(
        tmp_path / "s",
        num_items=2,
        grad_sizes=SIZES,
        attribute_tokens=True,
        offsets=offsets_from_counts(counts),
    ):
        pass
    (tmp_path / "s" / "offsets.npy").unlink()
    with pytest.raises(StoreError, match="offsets.npy is missing"):
        GradientStore.open(tmp_path / "s")
    (tmp_path / "run.part").mkdir()
    with pytest.raises(StoreError, match="did not finish"):
        GradientStore.open(tmp_path / "run")


@pytest.mark.parametrize("fmt", ["(6,)<f4", "('<f4', (6,))"], ids=["format-string", "tuple-repr"])
def test_legacy_structured_info(tmp_path, fmt):
    """Old bergson stores: structured ``dtype`` in info.json, no base_dtype/num_items."""
    rows = _rows(3).numpy()
    rows.astype("<f4").tofile(tmp_path / "gradients.bin")
    names = list(SIZES)
    info = {
        "num_grads": 3,
        "dtype": {
            "names": names,
            "formats": [fmt.replace("6", str(s)) for s in SIZES.values()],
            "offsets": [0, 24, 40],
            "itemsize": DIM * 4,
        },
    }
    (tmp_path / "info.json").write_text(json.dumps(info))
    store = GradientStore.open(tmp_path)
    assert store.info.legacy and not store.attribute_tokens
    assert store.num_items == 3 and store.dtype == torch.float32
    assert list(store.grad_sizes.items()) == list(SIZES.items())
    np.testing.assert_array_equal(store.rows(slice(None)).numpy(), rows)

    info["dtype"]["itemsize"] = DIM * 4 + 4
    (tmp_path / "info.json").write_text(json.dumps(info))
    with pytest.raises(StoreError, match="itemsize is 56 bytes but its fields sum to 52"):
        GradientStore.open(tmp_path)


def test_store_data_and_processor_attributes(tmp_path):
    datasets = pytest.importorskip("datasets")
    _small_store(tmp_path, n=2)
    store = GradientStore.open(tmp_path)
    assert store.data is None and store.processor is None
    datasets.Dataset.from_dict({"length": [3, 5]}).save_to_disk(str(tmp_path / "data.hf"))
    ProcessorConfig(projection_dim=16).save(tmp_path)
    store = GradientStore.open(tmp_path)
    assert store.data["length"] == [3, 5]
    assert store.processor.projection_dim == 16


# ------------------------------------------------------------------------------ run dir


@dataclass
class _Inner:
    x: int = 1
    names: tuple[str, ...] = ("a", "b")


@dataclass
class ToyConfig:
    inner: _Inner = field(default_factory=_Inner)
    higher_is_better: bool = True


def test_run_dir_protocol(tmp_path):
    target = tmp_path / "runs" / "r1"
    rd = RunDir(target)
    assert rd.path == tmp_path / "runs" / "r1.part" and rd.path.is_dir()
    assert not target.exists()
    rd.write_config(ToyConfig())
    rd.write_summary({"rows": 3, "path": target})
    (rd.path / "gradients.bin").write_bytes(b"abc")
    assert not target.exists()  # nothing final before commit
    assert rd.commit() == target
    assert target.is_dir() and not rd.part.exists()
    assert (target / "gradients.bin").read_bytes() == b"abc"
    assert json.loads((target / "summary.json").read_text())["rows"] == 3

    command, body, meta = read_run_config(target)
    assert command == "toy" and body == {
        "inner": {"x": 1, "names": ["a", "b"]},
        "higher_is_better": True,
    }
    assert meta["bergson_ray_version"] and meta["created"].endswith("+00:00")
    doc = yaml.safe_load((target / "config.yaml").read_text())
    assert list(doc) == ["steps", "metadata"]


def test_run_dir_refuses_existing(tmp_path):
    target = tmp_path / "r"
    RunDir(target).commit()
    with pytest.raises(RunExistsError, match="--overwrite.*--resume"):
        RunDir(target)
    (tmp_path / "q.part").mkdir()
    with pytest.raises(RunExistsError, match="q.part"):
        RunDir(tmp_path / "q")


def test_run_dir_overwrite_replaces_only_at_commit(tmp_path):
    target = tmp_path / "r"
    first = RunDir(target)
    (first.path / "old.txt").write_text("old")
    first.commit()
    second = RunDir(target, overwrite=True)
    assert (target / "old.txt").exists()  # a failing rerun would not lose the old run
    (second.path / "new.txt").write_text("new")
    second.commit()
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_run_dir_resume(tmp_path):
    target = tmp_path / "r"
    rd = RunDir(target)
    (rd.path / "partial.bin").write_text("half")
    del rd  # "crash": no commit
    resumed = RunDir(target, resume=True)
    assert resumed.resumed and (resumed.path / "partial.bin").read_text() == "half"
    resumed.commit()
    with pytest.raises(RunExistsError, match="already complete"):
        RunDir(target, resume=True)
    fresh = RunDir(tmp_path / "new", resume=True)  # nothing to resume: a new run
    assert not fresh.resumed and fresh.path.is_dir()


def test_run_config_mapping_for_bergson_readers(tmp_path):
    rd = RunDir(tmp_path / "s")
    rd.write_config({"score_cfg": ToyConfig(higher_is_better=False)}, command="score")
    command, body, _ = read_run_config(rd.path)
    assert command == "score" and body["score_cfg"]["higher_is_better"] is False
    with pytest.raises(StoreError, match="command="):
        rd.write_config({"a": 1})


# ---------------------------------------------------------------------------- processor


def test_processor_config_yaml_keys_in_bergson_order(tmp_path):
    cfg = ProcessorConfig(projection_dim=16, include_bias=True, projection_seed=3)
    cfg.save(tmp_path)
    text = (tmp_path / "processor_config.yaml").read_text()
    keys = [line.split(":")[0] for line in text.splitlines()]
    assert keys[:6] == [
        "projection_dim",
        "reshape_to_square",
        "projection_type",
        "projection_target",
        "projection_scale",
        "include_bias",
    ]
    assert ProcessorConfig.load(tmp_path) == cfg
    assert ProcessorConfig(projection_dim=0, projection_target="global").projection_dim is None


def test_processor_config_legacy_defaults(tmp_path):
    (tmp_path / "processor_config.yaml").write_text("projection_dim: 8\nreshape_to_square: false\n")
    cfg = ProcessorConfig.load(tmp_path)
    assert cfg.projection_dim == 8
    assert cfg.projection_type == "normal"
    assert cfg.include_bias is False
    assert cfg.projection_scale == "row_norm"
    assert cfg.projection_version == 1


def test_processor_files_roundtrip_and_bergson_pth(tmp_path):
    norms = {
        "h.0.mlp": NormalizerState("AdamNormalizer", {"weight_avg_sq": torch.rand(3, 4)}),
        "h.1.mlp": NormalizerState(
            "AdafactorNormalizer",
            {"row": torch.rand(3), "col": torch.rand(4), "bias_avg_sq": torch.rand(3)},
        ),
    }
    hess = {"h.0.mlp": torch.eye(4), "h.1.mlp": 2 * torch.eye(4)}
    evals, evecs = torch.linalg.eigh(hess["h.1.mlp"])
    eig = {"h.1.mlp": (evals, evecs)}
    save_processor(tmp_path, ProcessorConfig(projection_dim=2), normalizers=norms,
                   hessians=hess, hessians_eigen=eig)  # fmt: skip
    state = load_processor(tmp_path)
    assert state.config.projection_dim == 2
    assert {m: s.kind for m, s in state.normalizers.items()} == {
        m: s.kind for m, s in norms.items()
    }
    torch.testing.assert_close(
        state.normalizers["h.1.mlp"].tensors["col"], norms["h.1.mlp"].tensors["col"]
    )
    torch.testing.assert_close(state.hessians["h.1.mlp"], hess["h.1.mlp"])
    torch.testing.assert_close(state.hessians_eigen["h.1.mlp"][1], evecs)

    # the bergson .pth triple alone (their layout) reads back the same
    for name in ("normalizers.safetensors", "hessians.safetensors", "hessians_eigen.safetensors"):
        (tmp_path / name).unlink()
    pth = torch.load(tmp_path / "normalizers.pth", weights_only=True)
    assert pth["h.0.mlp"]["__class__"] == "AdamNormalizer"
    loaded = load_normalizers(tmp_path)
    torch.testing.assert_close(
        loaded["h.0.mlp"].tensors["weight_avg_sq"], norms["h.0.mlp"].tensors["weight_avg_sq"]
    )
    torch.testing.assert_close(load_hessians(tmp_path)["h.0.mlp"], torch.eye(4))
    torch.testing.assert_close(load_hessians_eigen(tmp_path)["h.1.mlp"][0], evals)

    # legacy names and the old "avg_sq" key
    (tmp_path / "hessians.pth").rename(tmp_path / "preconditioners.pth")
    torch.save(
        {"m": {"__class__": "AdamNormalizer", "avg_sq": torch.ones(2, 2)}},
        tmp_path / "normalizers.pth",
    )
    assert set(load_hessians(tmp_path)) == {"h.0.mlp", "h.1.mlp"}
    assert set(load_normalizers(tmp_path)["m"].tensors) == {"weight_avg_sq"}


def test_eigh_result_saved_without_unpacking_still_loads(tmp_path):
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    torch.save({"a": torch.linalg.eigh(h)}, tmp_path / "hessians_eigen.pth")
    values, vectors = load_hessians_eigen(tmp_path)["a"]
    torch.testing.assert_close(values, torch.tensor([1.0, 3.0]))


def test_pth_is_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"m": Evil()}, tmp_path / "hessians.pth")
    with pytest.raises(StoreError, match=r"hessians.pth is a pickle with code in it; .*safetensors"):
        load_hessians(tmp_path)
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    from bergson_ray.store.files import load_tensors_only

    with pytest.raises(StoreError, match="broken.pt is not a readable torch file"):
        load_tensors_only(tmp_path / "broken.pt")


def test_total_processed_json_and_pt(tmp_path):
    write_total_processed(tmp_path, 12345)
    t = torch.load(tmp_path / "total_processed.pt", weights_only=True)
    assert t.dtype == torch.int64 and t.ndim == 0 and int(t) == 12345
    assert read_total_processed(tmp_path) == 12345
    (tmp_path / "total_processed.json").unlink()
    assert read_total_processed(tmp_path) == 12345
    assert read_total_processed(tmp_path / "nowhere") is None
