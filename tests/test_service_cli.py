"""A service started by the CLI, queried from a second Python process.

This module starts its own Ray head (:class:`~bergson_ray.testing.ray_head.LocalHead`) so
the CLI and the client attach to a cluster that outlives each of them, exactly as users
run it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import subprocess_env

from bergson_ray.query.attributor import Attributor
from bergson_ray.query.testing import tiny_store
from bergson_ray.testing.ray_head import LocalHead

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent
NS = "bergson_ray_xproc"
TEXTS = ["The assert statement checks a condition", "Assignment binds names to objects"]
ENV = subprocess_env(OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def head():
    with LocalHead(object_store_bytes=256 << 20, env=ENV) as h:
        yield h.address


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
