"""The scripts in examples/ compile and document themselves; python_api.py runs end to end.

Only one example is run (CI time): ``python_api.py`` covers build, reduce, score and both
store readers. It runs as a subprocess with its own local Ray under a private temp dir,
so it never joins another Ray on the machine; if it overruns, exactly the processes it
started are killed (its process group, then anything still under that temp dir).
"""

from __future__ import annotations

import ast
import os
import py_compile
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))
EXPECTED = {"python_api.py", "per_token_attribution.py", "query_service_client.py", "submit_job.py"}


def test_every_example_is_listed_in_the_readme():
    assert EXPECTED <= {p.name for p in SCRIPTS}
    readme = (EXAMPLES / "README.md").read_text()
    for path in SCRIPTS:
        assert f"examples/{path.name}" in readme, f"{path.name} is missing from examples/README.md"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_example_compiles_and_has_a_docstring(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / f"{path.stem}.pyc"), doraise=True)
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path.name} needs a module docstring (what it shows, how to run it)"
    assert f"examples/{path.name}" in doc, f"{path.name}'s docstring should show how to run it"


def _kill_started(proc: subprocess.Popen, marker: str) -> None:
    """SIGKILL our process group, then whatever still runs with ``marker`` in its cmdline."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_python_api_example_runs(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="bex", dir="/tmp")  # short: Ray puts sockets under it
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "RAY_TMPDIR": ray_tmp,  # a private Ray: never attach to another one on this machine
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(EXAMPLES / "python_api.py"), "--out", str(tmp_path / "runs")]
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=560)
    except subprocess.TimeoutExpired:
        _kill_started(proc, ray_tmp)
        out, _ = proc.communicate()
        pytest.fail(f"examples/python_api.py ran over 560 s; its output ended with:\n{out[-4000:]}")
    finally:
        if proc.poll() is None:
            _kill_started(proc, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, f"exit code {proc.returncode}; output ended with:\n{out[-4000:]}"
    assert "Top 5 training rows" in out, out[-4000:]
    top = re.findall(r"^\s+[1-5]\. row +\d+\*? +cos [+-]\d\.\d{3}  \S", out, flags=re.M)
    assert len(top) == 5, f"expected 5 top rows with text, got {top}\n{out[-4000:]}"
    assert (tmp_path / "runs" / "scores" / "top_k.parquet").is_file()
