"""Ray Jobs: bergson-ray commands submitted, unchanged, to a real ``ray start --head``.

The head gets its own temp dir and free ports and is stopped by killing exactly the
processes it started (never ``ray stop``, which would kill every Ray on the machine).
The test process itself never connects to that cluster: it talks HTTP to the job
server and compares stores with in-process (Ray-free) gradients.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same, rows_of, subprocess_env, tiny_runner_spec

from bergson_ray.runners.gradient_runner import GradientRunner
from bergson_ray.store.gradient_store import GradientStore
from bergson_ray.testing.ray_head import LocalHead

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SPLIT = "train[:16]"
BUILD_ARGS = [
    "--dataset", "tiny", "--split", SPLIT, "--projection_dim", "8", "--truncation",
    "--token_batch_size", "4096", "--num_workers", "1",
]  # fmt: skip


def job_env() -> dict[str, str]:
    return subprocess_env(
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `bergson-ray` for the job shell
    )


def our_pids(marker: str) -> list[int]:
    """Processes whose command line mentions our private temp dir."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace"
                ):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def head():
    with LocalHead(dashboard=True, env=job_env()) as h:
        yield h


def submit_cli(head: LocalHead, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head.url,
        "--working-dir",
        str(REPO),
        "--",
    ]
    return subprocess.run(
        cmd + list(args), env=job_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


_REFERENCE: dict = {}


def in_process(n: int) -> dict[str, np.ndarray]:
    """Ray-free gradients of the first ``n`` rows (the first 40 computed once)."""
    if not _REFERENCE:
        _REFERENCE.update(GradientRunner(tiny_runner_spec()).gradients(np.arange(40)))
    return {k: np.asarray(v)[:n] for k, v in _REFERENCE.items()}


def in_process_rows(n: int) -> np.ndarray:
    return in_process(n)["grads"]


def test_cli_job_build_equals_in_process(head, tmp_path):
    out = tmp_path / "idx"
    res = submit_cli(head, "bergson-ray", "build", str(out), *BUILD_ARGS)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "succeeded" in (res.stdout + res.stderr).lower()
    # the job's driver joined the running cluster (RAY_ADDRESS) instead of starting one
    assert "Started a local Ray instance" not in res.stdout + res.stderr
    assert (out / "summary.json").exists() and not Path(f"{out}.part").exists()
    assert_same(rows_of(out), in_process_rows(16))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_received"] == 16 and summary["duplicate_rows"] == 0
    assert summary["tokens"] > 0 and summary["bytes_written"] > 0


def test_client_job_build_to_a_uri(head, tmp_path):
    """JobSubmissionClient, and the run path as a URI: staged locally, uploaded by pyarrow."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head.url)
    dest = tmp_path / "remote" / "idx"
    job = client.submit_job(
        entrypoint="bergson-ray build file://" + str(dest) + " " + " ".join(BUILD_ARGS),
        runtime_env={
            "working_dir": str(REPO),
            "env_vars": {"BERGSON_RAY_STAGING": str(tmp_path / "staging")},
        },
    )
    deadline = time.time() + 420
    status = None
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert f"gradient store written to file://{dest}" in logs
    assert_same(rows_of(dest), in_process_rows(16))
    assert not any((tmp_path / "staging").rglob("gradients.bin")), "staging copy left behind"


def test_stage_metrics_reach_rays_metrics_endpoint(ray_session):
    """What the dashboard / Prometheus read: the driver's counters and gauges."""
    from bergson_ray.utils.metrics import StageMonitor

    mon = StageMonitor("test-stage", total=8, run="metrics-test")
    mon.update({"idx": np.arange(4), "length": np.full(4, 10), "node": np.array(["n1"] * 4)})
    mon.update({"idx": np.arange(4, 8), "length": np.full(4, 5), "node": np.array(["n2"] * 4)})
    s = mon.summary()
    assert s["rows_received"] == 8 and s["stage_tokens"] == 60 and s["duplicate_rows"] == 0
    assert s["rows_per_node"] == {"n1": 4, "n2": 4}
    port = ray_session._private.worker.global_worker.node.metrics_export_port
    found = ""
    deadline = time.time() + 60  # Ray exports every ~10 s
    while time.time() < deadline and not found:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        found = next(
            (
                ln
                for ln in text.splitlines()
                if ln.startswith("ray_bergson_ray_tokens_total{") and 'run="metrics-test"' in ln
            ),
            "",
        )
        time.sleep(1)
    assert found and float(found.rsplit(" ", 1)[1]) == 60.0, found


def test_relative_run_path_in_job_fails_fast(head):
    res = submit_cli(head, "bergson-ray", "build", "runs/idx", *BUILD_ARGS, timeout=240)
    assert res.returncode != 0
    assert "is relative" in res.stdout + res.stderr


def test_killed_job_driver_leaves_a_resumable_run(head, tmp_path, ray_session):
    """SIGKILL the job's driver mid-build; ``--resume`` computes only the missing rows."""
    from ray.job_submission import JobSubmissionClient

    out = tmp_path / "idx"
    args = [a if a != SPLIT else "train[:40]" for a in BUILD_ARGS] + ["--window_size", "1"]
    client = JobSubmissionClient(head.url)
    job = client.submit_job(
        entrypoint=f"bergson-ray build {out} " + " ".join(args),
        runtime_env={"working_dir": str(REPO)},
    )
    written = Path(f"{out}.part") / "written.bin"
    deadline = time.time() + 420
    done = 0
    while time.time() < deadline and not out.exists():
        if written.exists():
            done = int(np.fromfile(written, dtype=np.uint8).astype(bool).sum())
            if done >= 2:
                break
        time.sleep(0.05)
    drivers = our_pids(f"build {out} ")
    assert drivers and done >= 2 and not out.exists(), (done, client.get_job_logs(job)[-3000:])
    for pid in drivers:
        os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    before = int(np.fromfile(written, dtype=np.uint8).astype(bool).sum())
    assert 0 < before < 40 and not out.exists()

    from bergson_ray.pipelines.build import build

    final = build(
        run_path=out, dataset="tiny", split="train[:40]", projection_dim=8, truncation=True,
        token_batch_size=4096, num_workers=1, resume=True,
    )  # fmt: skip
    summary = json.loads((final / "summary.json").read_text())
    assert summary["computed_documents"] == 40 - before
    assert summary["rows_received"] == 40 - before and summary["duplicate_rows"] == 0
    want = in_process(40)
    assert_same(rows_of(final), want["grads"])
    store = GradientStore.open(final)
    np.testing.assert_array_equal(np.asarray(store.data["length"]), want["length"])
    np.testing.assert_allclose(np.asarray(store.data["loss"]), want["loss"], rtol=1e-5)
