"""Multi-node behaviour on a simulated cluster (``ray.cluster_utils.Cluster``).

A head and two worker nodes on this machine. Custom resources force placement:
``worker`` exists only on the worker nodes (one unit each, so a pool of 2 puts one
actor on each), ``w1`` / ``w2`` name a single node. Every output row carries the id
of the node that computed it, so the tests can check where work really ran.

The module disconnects the session Ray first (a process talks to one cluster at a
time) and starts an equivalent one again when it is done.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
from helpers import TINY_BUILD, assert_same, rows_of, summary_of

from bergson_ray.errors import BadInputError
from bergson_ray.pipelines.build import build
from bergson_ray.pipelines.score import score
from bergson_ray.pipelines.storage import make_probe, probe_problems
from bergson_ray.store.score_store import ScoreStore
from bergson_ray.testing.faults import FaultPlan

N = 40
MiB = 1024**2


def assert_exactly_once(path) -> None:
    s = summary_of(path)
    assert s["rows_received"] == N and s["duplicate_rows"] == 0, s


# --- Ray-free: the storage probe ---------------------------------------------------------
def test_probe_sees_the_run_dir_and_reports_what_is_missing(tmp_path):
    run = tmp_path / "idx.part"
    run.mkdir()
    probe = make_probe(run, SimpleNamespace(dataset=str(tmp_path / "data.jsonl")), None)
    assert probe_problems(probe) == [f"dataset path {tmp_path / 'data.jsonl'} does not exist"]
    (tmp_path / "data.jsonl").write_text("{}\n")
    assert probe_problems(probe) == []
    # a node with its own (unshared) directory of the same name
    (run / ".bergson_ray_visibility").write_text("another token")
    assert "another directory" in probe_problems(probe)[0]
    probe = make_probe(run)
    probe.verify()  # this process sees it
    with pytest.raises(BadInputError, match="cannot see .*run path .* is not the driver's"):
        probe.verify(blind=True)  # a node without the shared file system


@pytest.mark.parametrize(
    ("gpus", "possible", "device", "want_device", "warns"),
    [
        (0, 0, "auto", "cpu", "on a cluster without GPUs"),  # CPU-only at the moment
        (0, 8, "auto", "cuda", "no GPU right now"),  # the autoscaler can add GPU nodes
        (0, 0, "cuda", "cuda", "no GPU right now"),  # told so explicitly
        (4, 4, "auto", "cuda", None),
    ],
)
def test_worker_pool_on_an_autoscaling_cluster(
    monkeypatch, caplog, gpus, possible, device, want_device, warns
):
    """``--num_workers 0`` with no GPU up yet: a warning, and GPU workers when GPUs can come."""
    from bergson_ray.config import RayConfig
    from bergson_ray.pipelines import placement, workers
    from bergson_ray.utils import ray_env

    monkeypatch.setattr(placement, "gpu_capacity", lambda: (gpus, possible))
    monkeypatch.setattr(ray_env, "cluster_cpus", lambda: 8.0)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with caplog.at_level("WARNING"):
        pool = workers.worker_pool(RayConfig(num_workers=0, worker_device=device))
    assert pool.device == want_device and pool.size == max(1, gpus)
    if warns:
        assert warns in caplog.text
    else:
        assert "GPU" not in caplog.text


# --- the simulated cluster -------------------------------------------------------------
def _restore_session_ray() -> None:
    """Bring back the session-wide local Ray (same settings as conftest's fixture)."""
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=512 * MiB,
            namespace="bergson_ray_tests",
            log_to_driver=False,
        )


@pytest.fixture(scope="module")
def mn(tiny_assets):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"head": 1},
            "object_store_memory": 256 * MiB,
            "include_dashboard": False,
        },
    )
    nodes = {}
    try:
        for name in ("w1", "w2"):
            nodes[name] = cluster.add_node(
                num_cpus=1, resources={"worker": 1, name: 1}, object_store_memory=256 * MiB
            )
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="bergson_ray_multinode", log_to_driver=False)
        yield SimpleNamespace(cluster=cluster, nodes=nodes, head=cluster.head_node.node_id)
    finally:
        ray.shutdown()
        cluster.shutdown()
        _restore_session_ray()


def node_id(node) -> str:
    return node.node_id


@pytest.fixture(scope="module")
def one_node(mn, tmp_path_factory):
    """The reference: one worker, pinned to node w1."""
    out = build(
        run_path=tmp_path_factory.mktemp("one") / "idx",
        num_workers=1,
        worker_resources="w1=1",
        **TINY_BUILD,
    )
    assert set(summary_of(out)["rows_per_node"]) == {node_id(mn.nodes["w1"])}
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_build_spread_over_two_worker_nodes_equals_one_node(mn, one_node, tmp_path):
    out = build(
        run_path=tmp_path / "idx",
        num_workers=2,
        worker_resources="worker=1",
        window_size=4,
        faults=FaultPlan(batch_delay_s=0.2),
        **TINY_BUILD,
    )
    per_node = summary_of(out)["rows_per_node"]
    assert set(per_node) == {node_id(mn.nodes["w1"]), node_id(mn.nodes["w2"])}, per_node
    assert mn.head not in per_node
    assert_exactly_once(out)
    assert_same(rows_of(out), rows_of(one_node))
    # the workers wrote the rows on their nodes: the driver got tens of bytes per row
    row_bytes = rows_of(out).shape[1] * 4
    assert summary_of(out)["driver_bytes_per_row"] <= 56 < row_bytes, summary_of(out)


@pytest.mark.slow
@pytest.mark.ray
def test_node_without_the_shared_path_fails_fast(mn, tmp_path):
    """A node that cannot see the run directory stops the run before any worker starts."""
    runs = tmp_path / "runs"
    runs.mkdir()
    blind = mn.cluster.add_node(num_cpus=1, resources={"blind": 1})
    try:
        mn.cluster.wait_for_nodes()
        faults = FaultPlan(unshared_nodes=(node_id(blind),))
        with pytest.raises(BadInputError, match="cannot see what the driver wrote") as info:
            build(
                run_path=runs / "idx", num_workers=1, worker_resources="w1=1", faults=faults, **TINY_BUILD
            )
        assert "run path" in str(info.value) and "idx.part" in str(info.value)
        written = np.fromfile(runs / "idx.part" / "written.bin", dtype=np.uint8)
        assert not written.any(), "rows were computed although the check failed"
        assert not (runs / "idx").exists()
    finally:
        mn.cluster.remove_node(blind)


def _run_in_thread(fn, **kwargs):
    box: dict = {}

    def target():
        try:
            box["out"] = fn(**kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised by the test
            box["err"] = err

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def _remove_mid_run(mn, name: str, trace: Path, thread: threading.Thread) -> None:
    """Wait until the victim node finished a batch, then pull it out of the cluster."""
    victim = mn.nodes[name]
    deadline = time.time() + 420
    while time.time() < deadline and thread.is_alive():
        if any(p.name.startswith(node_id(victim)) for p in trace.iterdir()):
            break
        time.sleep(0.2)
    assert thread.is_alive(), "the run ended before the node could be removed"
    assert any(p.name.startswith(node_id(victim)) for p in trace.iterdir()), "victim never worked"
    mn.cluster.remove_node(victim, allow_graceful=False)
    assert thread.is_alive(), "the run ended before the node was removed"


def _replace(mn, name: str) -> None:
    mn.nodes[name] = mn.cluster.add_node(
        num_cpus=1, resources={"worker": 1, name: 1}, object_store_memory=256 * MiB
    )
    mn.cluster.wait_for_nodes()


@pytest.mark.slow
@pytest.mark.ray
def test_worker_node_removed_mid_build_gives_the_identical_store(mn, one_node, tmp_path):
    trace = tmp_path / "trace"
    trace.mkdir()
    thread, box = _run_in_thread(
        build,
        run_path=tmp_path / "idx",
        num_workers=2,
        worker_resources="worker=1",
        window_size=4,
        faults=FaultPlan(batch_delay_s=0.5, trace_dir=str(trace)),
        **TINY_BUILD,
    )
    try:
        _remove_mid_run(mn, "w2", trace, thread)
        thread.join(timeout=600)
        assert not thread.is_alive(), "build hung after the node was removed"
        if "err" in box:
            raise box["err"]
        out = box["out"]
        assert_exactly_once(out)
        assert_same(rows_of(out), rows_of(one_node))
        assert node_id(mn.nodes["w1"]) in summary_of(out)["rows_per_node"]
    finally:
        _replace(mn, "w2")


@pytest.mark.slow
@pytest.mark.ray
def test_worker_node_removed_mid_score_gives_the_identical_scores(mn, one_node, tmp_path):
    trace = tmp_path / "trace"
    trace.mkdir()
    thread, box = _run_in_thread(
        score,
        run_path=tmp_path / "scores",
        query_path=str(one_node),
        num_workers=2,
        worker_resources="worker=1",
        window_size=4,
        faults=FaultPlan(batch_delay_s=0.5, trace_dir=str(trace)),
        **TINY_BUILD,
    )
    try:
        _remove_mid_run(mn, "w2", trace, thread)
        thread.join(timeout=600)
        assert not thread.is_alive(), "score hung after the node was removed"
        if "err" in box:
            raise box["err"]
        out = box["out"]
        assert_exactly_once(out)
        store = ScoreStore.open(out)
        assert store.written.all()
        rows = rows_of(one_node)
        assert_same(np.asarray(store.scores, dtype=np.float32), rows @ rows.T, tol=1e-5)
    finally:
        _replace(mn, "w2")
