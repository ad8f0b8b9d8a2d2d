"""One local worker in the driver's process (``--executor process``, the default for a
fresh single-worker local run) computes what a Ray actor pool computes: the same store
bytes and Hessian sums, and scores, sums and eigendecompositions equal to the last bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import subprocess_env

from bergson_ray.config import RayConfig
from bergson_ray.errors import BadInputError
from bergson_ray.pipelines import in_process
from bergson_ray.pipelines.build import build
from bergson_ray.pipelines.reduce import reduce
from bergson_ray.pipelines.score import score
from bergson_ray.store.gradient_store import GradientStore
from bergson_ray.store.score_store import ScoreStore

N = 12
COMMON = dict(dataset="tiny", split=f"train[:{N}]", projection_dim=8, truncation=True, window_size=5)


def summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.ray
def test_process_and_ray_pools_give_the_same_results(tmp_path, ray_session, tiny_assets):
    """build, score and reduce: the in-process worker against a one-worker Ray pool."""
    runs = {}
    for ex in ("process", "ray"):
        b = build(run_path=tmp_path / f"b_{ex}", executor=ex, num_workers=1, **COMMON)
        s = score(run_path=tmp_path / f"s_{ex}", executor=ex, query_path=str(b), **COMMON)
        r = reduce(run_path=tmp_path / f"r_{ex}", executor=ex, **COMMON)
        runs[ex] = (b, s, r)
        assert {summary(x)["executor"] for x in (b, s, r)} == {ex}
    (bp, sp, rp), (br, sr, rr) = runs["process"], runs["ray"]
    assert (bp / "gradients.bin").read_bytes() == (br / "gradients.bin").read_bytes()
    # Scoring multiplies a whole batch of rows by the queries: Ray Data may re-cut the
    # batches, and BLAS rounds a row differently in another batch shape (last bits only).
    got, want = ScoreStore.open(sp).scores, ScoreStore.open(sr).scores
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
    one = [GradientStore.open(x).rows(np.arange(1)).numpy() for x in (rp, rr)]
    np.testing.assert_allclose(*one, rtol=1e-6)
    assert summary(bp)["startup"]["ray_start_s"] == 0.0
    assert summary(bp)["rows_per_node"] == {"driver": N}
    assert summary(bp)["workers_seen"] == summary(br)["workers_seen"] == 1
    assert summary(bp)["rows_per_worker_min_max"] == [N, N]
    for run in (bp, br):  # one worker: its windows' busy spans lie inside its all-busy span
        s = summary(run)
        assert 0 < s["all_busy_seconds"] <= s["stage_seconds"], s
        assert s["all_busy_tokens_per_second"] <= 1.001 * s["compute_tokens_per_second_per_worker"]
    for run in (bp, br):  # the first gradients come after the stage began, before a window is back
        st = summary(run)["startup"]
        stage_begun = st["process_to_stage_s"] + st["ray_start_s"]
        first_window = stage_begun + st["workers_to_first_batch_s"]
        assert stage_begun < st["first_gradient_s"] <= first_window + 0.01, st


@pytest.mark.ray
def test_hessian_in_process_sums_the_same_bytes_as_a_ray_pool(tmp_path, ray_session, tiny_assets):
    """KFAC + EK-FAC on two shards: the worker and both shards in this process (no Ray)
    against a one-worker Ray pool. Every factor is a sum over the same windows in the
    same order: the same bytes. Eigendecompositions (``eigh`` on another thread count,
    stored in fp32) agree to a few fp32 roundings."""
    import torch
    from safetensors.torch import load_file

    from bergson_ray.pipelines.hessian import hessian

    runs = {
        ex: hessian(run_path=tmp_path / ex, dataset="tiny", split=f"train[:{N}]", method="kfac",
                    ev_correction=True, num_shards=2, window_size=5, executor=ex)
        for ex in ("process", "ray")
    }  # fmt: skip
    assert {ex: summary(r)["executor"] for ex, r in runs.items()} == {"process": "process", "ray": "ray"}
    files = sorted(p.relative_to(runs["ray"]) for p in runs["ray"].rglob("*.safetensors"))
    assert len(files) == 16 and files == sorted(
        p.relative_to(runs["process"]) for p in runs["process"].rglob("*.safetensors")
    )
    for f in files:
        got, want = (load_file(str(r / f)) for r in (runs["process"], runs["ray"]))
        assert got.keys() == want.keys()
        for k in want:
            if f.parts[0] in ("activation_sharded", "gradient_sharded"):
                assert torch.equal(got[k], want[k]), (f, k)
            else:
                scale = want[k].abs().max().item()  # fp32 rounding of an fp64 eigh
                torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5 * scale + 1e-30,
                                           msg=lambda m, f=f, k=k: f"{f} {k}: {m}")  # fmt: skip
    assert summary(runs["process"])["positions"] == summary(runs["ray"])["positions"] > 0


def test_local_handles_keep_rays_calling_convention():
    """What ShardedFit relies on in process: results by ``get``, ``num_returns`` splits,
    refs passed as arguments arrive as values, a call's error is raised by ``get``."""
    from bergson_ray.actors.local_handles import LocalClass, LocalRay, get, kill

    class Acc:
        def __init__(self, start):
            self.total = start

        def add(self, x):
            self.total += x
            return self.total

        def split(self, k):
            return tuple(range(k))

        def fail(self):
            raise ValueError("boom")

    ray = LocalRay()
    a = LocalClass(Acc).options(num_cpus=1).remote(10)
    first = a.add.remote(5)
    assert ray.get(a.add.remote(first)) == 30  # the ref's value (15) was added
    parts = a.split.options(num_returns=3).remote(3)
    assert ray.get(parts) == [0, 1, 2]
    ready, rest = ray.wait(parts, num_returns=1)
    assert ready == parts[:1] and rest == parts[1:]
    bad = a.fail.remote()  # no exception until get, as with Ray
    with pytest.raises(ValueError, match="boom"):
        ray.get(bad)
    assert get(parts) == [0, 1, 2] and get(first) == 15  # the either-kind helpers
    kill(a)
    with pytest.raises(AttributeError):
        a.add.remote(1)


def test_auto_runs_in_process_only_where_ray_would_start_for_one_worker(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(in_process, "_live_local_head", lambda: False)
    monkeypatch.setattr(in_process, "_local_gpus", lambda: 0)
    ray = sys.modules.get("ray")
    if ray is not None:
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert in_process.runs_in_process(RayConfig())
    assert in_process.runs_in_process(RayConfig(num_workers=1))
    assert not in_process.runs_in_process(RayConfig(num_workers=2))
    assert not in_process.runs_in_process(RayConfig(executor="ray"))
    assert not in_process.runs_in_process(RayConfig(), faults=object())  # tests of Ray's restarts
    assert not in_process.runs_in_process(RayConfig(executor="process"), faults=object())
    assert not in_process.runs_in_process(RayConfig(fsdp=True))
    assert not in_process.runs_in_process(RayConfig(worker_resources="big=1"))
    assert not in_process.runs_in_process(RayConfig(address="127.0.0.1:6379"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not in_process.runs_in_process(RayConfig())
    assert in_process.runs_in_process(RayConfig(executor="process"))  # asked for explicitly
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(in_process, "_local_gpus", lambda: 2)  # one worker per GPU: Ray
    assert not in_process.runs_in_process(RayConfig())
    monkeypatch.setattr(in_process, "_local_gpus", lambda: 0)
    monkeypatch.setattr(in_process, "_live_local_head", lambda: True)  # `ray start` kept up
    assert not in_process.runs_in_process(RayConfig())
    if ray is not None:
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        monkeypatch.setattr(in_process, "_live_local_head", lambda: False)
        assert not in_process.runs_in_process(RayConfig())  # a caller's own Ray is used


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(num_workers=2), "--executor process runs one worker"),
        (dict(fsdp=True), "cannot shard with --fsdp"),
        (dict(address="127.0.0.1:1"), "runs without Ray"),
    ],
)
def test_process_executor_refuses_what_needs_ray(kw, words):
    with pytest.raises(BadInputError, match=words):
        RayConfig(executor="process", **kw)


def test_one_worker_commands_never_import_ray(tmp_path, tiny_assets):
    """Plain one-worker ``build``, ``score``, ``reduce`` and ``hessian`` on this machine,
    one after another in one process: Ray is not even imported (its import alone costs
    ~0.4 s), the thread count follows the machine, and the summaries say where they ran."""
    code = (
        "import json, sys\n"
        "from bergson_ray.cli.main import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    assert main(argv) == 0, argv\n"
        "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY')\n"
    )
    data = ["--dataset", "tiny", "--split", "train[:6]", "--truncation", "true"]
    b, s, r, h = (tmp_path / k for k in "bsrh")
    commands = [
        ["build", str(b), *data, "--projection_dim", "4"],
        ["score", str(s), *data, "--projection_dim", "4", "--query_path", str(b), "--score", "mean"],
        ["reduce", str(r), *data, "--projection_dim", "4"],
        ["hessian", str(h), *data],
    ]
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(commands)],
        env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=os.getcwd(),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "NO_RAY"
    for run in (b, s, r):
        assert summary(run)["executor"] == "process", run
    assert summary(b)["rows"] == 6


def test_the_start_up_clock_starts_with_the_process():
    """``summary.json``'s start-up breakdown counts from the process's start: read to the
    kernel's tick, not psutil's (boot time in whole seconds, up to 1 s off)."""
    before = time.time()
    out = subprocess.run(
        [sys.executable, "-c",
         "import time; from bergson_ray.utils.metrics import _process_start; "
         "print(repr(_process_start()), repr(time.time()))"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    after = time.time()
    start, now = map(float, out.stdout.split())
    assert before - 0.02 <= start <= now <= after


@pytest.mark.ray
@pytest.mark.parametrize("max_blocks", [4096, 2])  # one window per block; several per block
def test_a_ray_pool_gets_the_in_process_windows(ray_session, monkeypatch, max_blocks):
    """The Ray dataset's blocks are whole windows, so ``map_batches(batch_size=window)``
    gives a Ray worker the windows a worker in the driver's process gets (the same
    documents share padded batches, hence the same bytes)."""
    import ray

    from bergson_ray.pipelines import workers

    class SeenWindows:  # defined here: Ray pickles it by value (workers cannot import tests)
        """Tags each row with the first row and the size of its batch."""

        def __call__(self, batch):
            idx = batch["idx"]
            return {"idx": idx, "first": np.full(len(idx), idx[0]), "size": np.full(len(idx), len(idx))}

    monkeypatch.setattr(workers, "MAX_BLOCKS", max_blocks)
    rows = np.random.default_rng(0).permutation(23)
    ds = workers.index_dataset(rows, 5).map_batches(
        SeenWindows, batch_size=5, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
    )  # fmt: skip
    out = {k: np.concatenate([b[k] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
           for k in ("idx", "first", "size")}  # fmt: skip
    seen = {}
    for i, first, size in zip(out["idx"], out["first"], out["size"]):
        seen.setdefault(int(first), []).append(int(i))
        assert len(seen[int(first)]) <= size
    want = workers.index_windows(rows, 5)
    assert sorted(map(sorted, seen.values())) == sorted(sorted(w.tolist()) for w in want)


NO_TASKS = """
import json, sys, time
import numpy as np, psutil
from bergson_ray.utils.ray_env import init_ray
init_ray(num_cpus=2)
from bergson_ray.pipelines import workers
workers.MAX_BLOCKS = int(sys.argv[1])
def is_worker(cmd):  # a Ray worker, before or after it renames itself (not an agent)
    return (len(cmd) > 1 and cmd[1].endswith("default_worker.py")) or (
        bool(cmd) and cmd[0].startswith("ray::") and "Agent" not in cmd[0])
def python_workers():
    return sum(is_worker(c.cmdline()) for c in psutil.Process().children(recursive=True))
before = python_workers()
ds = workers.index_dataset(np.arange(23), 5)
time.sleep(3)  # a task would have had Ray start a worker process by now
print(json.dumps([before, python_workers(), ds.num_blocks()]))
"""


@pytest.mark.ray
def test_the_index_dataset_starts_no_worker_process():
    """Building a pool's input runs no Ray task: ``from_arrow`` ran one metadata task per
    block, for which Ray started two Python workers that sat idle through the run (about
    220 MiB and a CPU-second each on a 2-core machine). A fresh local Ray without
    prestarted workers, in a subprocess."""
    env = {**subprocess_env(), "RAY_prestart_worker_first_driver": "0"}
    out = subprocess.run([sys.executable, "-c", NO_TASKS, "2"], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, blocks = json.loads(out.stdout.strip().splitlines()[-1])
    assert blocks == 2  # 5 windows, at most 2 blocks: several windows per block
    assert before == after == 0, (before, after)


@pytest.mark.ray
def test_a_pool_never_outnumbers_its_input_blocks(tmp_path, ray_session, tiny_assets, monkeypatch):
    """Each block of the index dataset goes to one worker, so a pool larger than the
    block count would load the model in workers that never get a window (and Ray Data
    warns about it). ``index_blocks`` predicts the count; the pool is cut to it."""
    import warnings

    from bergson_ray.pipelines import workers

    for rows, window, max_blocks in [(23, 5, 4096), (23, 5, 2), (1, 5, 4096), (0, 5, 4096),
                                     (3 * 4096 - 1, 1, 4096)]:  # fmt: skip
        monkeypatch.setattr(workers, "MAX_BLOCKS", max_blocks)
        ds = workers.index_dataset(np.arange(rows), window)
        assert workers.index_blocks(rows, window) == ds.num_blocks(), (rows, window, max_blocks)
    monkeypatch.setattr(workers, "MAX_BLOCKS", 4096)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = build(run_path=tmp_path / "b", executor="ray", num_workers=2,
                    **{**COMMON, "window_size": 64})  # fmt: skip
    assert summary(out)["rows"] == N
    assert not [str(w.message) for w in caught if "concurrent actors" in str(w.message)]
