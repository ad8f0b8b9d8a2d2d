"""A service started by the CLI, queried from a second Python process.

This module starts its own Ray head (``ray start --head --block`` in a new session, under
a private temp dir) so the CLI and the client attach to a cluster that outlives each of
them, exactly as users run it. Teardown kills exactly the processes it started (its
process group, then anything still running under its temp dir). ``ray stop`` is never
used: it would kill every Ray on the machine.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import kill_process_tree, subprocess_env

from bergson_ray.query.attributor import Attributor
from bergson_ray.query.testing import tiny_store
from bergson_ray.utils.net import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent
NS = "bergson_ray_xproc"
TEXTS = ["The assert statement checks a condition", "Assignment binds names to objects"]
ENV = subprocess_env(OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def head():
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="brq", dir="/tmp")  # short: Ray puts sockets under it
    log = open(Path(tmp) / "head.log", "w")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false",
         "--num-cpus=2", "--object-store-memory=268435456", f"--temp-dir={tmp}", "--block"],
        env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        probe = f"import ray; ray.init(address={address!r}); ray.shutdown()"
        for _ in range(60):
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(Path(tmp) / 'head.log').read_text()}")
            r = subprocess.run(
                [sys.executable, "-c", probe], env=ENV, capture_output=True, timeout=60
            )
            if r.returncode == 0:
                break
            time.sleep(1)
        else:
            raise RuntimeError("the Ray head did not come up")
        yield address
    finally:
        kill_process_tree(proc, tmp, ((signal.SIGTERM, 10), (signal.SIGKILL, 10)))
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    base = tiny_store(tmp_path_factory.getbasetemp() / "query-tiny48", n_docs=48)
    dst = tmp_path_factory.mktemp("xproc") / "store"
    shutil.copytree(base, dst, ignore=shutil.ignore_patterns("faiss_*"))
    return dst


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "bergson-ray"), "--log_level", "WARNING", *args],
        env=ENV, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


CLIENT = textwrap.dedent(
    """
    import json, sys
    import bergson_ray
    client = bergson_ray.connect(address=sys.argv[1], name="xproc", namespace=sys.argv[2])
    res = client.query(json.loads(sys.argv[3]), k=5)
    print(json.dumps([r.to_dict() for r in res]))
    """
)


def test_cli_service_answers_a_second_process_like_the_attributor(head, store):
    up = cli("serve", str(store), "--name", "xproc", "--address", head, "--namespace", NS,
             "--num_shards", "2")  # fmt: skip
    assert up.returncode == 0, up.stderr
    assert "service 'xproc' is up" in up.stdout
    try:
        r = subprocess.run(
            [sys.executable, "-c", CLIENT, head, NS, json.dumps(TEXTS)],
            env=ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout.strip().splitlines()[-1])
        want = Attributor(store, num_shards=2).query(TEXTS, k=5)
        for g, w in zip(got, want):
            assert g["ids"] == w.ids and g["texts"] == w.texts
            np.testing.assert_allclose(g["scores"], w.scores, rtol=1e-5)

        q = cli("query", "--name", "xproc", "--address", head, "--namespace", NS,
                "--query", TEXTS[0], "--k", "5", "--format", "json")  # fmt: skip
        assert q.returncode == 0, q.stderr
        assert json.loads(q.stdout)[0]["ids"] == want[0].ids

        bad = cli("query", "--name", "xproc", "--address", head, "--namespace", NS,
                  "--query", TEXTS[0], "--k", "0")  # fmt: skip
        assert bad.returncode == 2 and "k must be >= 1" in bad.stderr
        assert "Traceback" not in bad.stderr

        st = cli("status", "--address", head, "--namespace", NS)
        assert st.returncode == 0 and "xproc:" in st.stdout and "shards=2" in st.stdout
    finally:
        down = cli("stop", "--name", "xproc", "--address", head, "--namespace", NS)
    assert down.returncode == 0, down.stderr
    assert "xproc::shard-1" in down.stdout
    st = cli("status", "--address", head, "--namespace", NS)
    assert "no query service is running" in st.stdout
    again = cli("stop", "--name", "xproc", "--address", head, "--namespace", NS)
    assert again.returncode == 2 and "no service named 'xproc'" in again.stderr
