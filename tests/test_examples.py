"""The scripts in examples/ compile and document themselves; python_api.py runs end to end.

Only one example is run (CI time): ``python_api.py`` covers build, reduce, score and both
store readers. It runs as a subprocess with its own local Ray under a private temp dir,
so it never joins another Ray on the machine; if it overruns, exactly the processes it
started are killed (its process group, then anything still under that temp dir).
"""

from __future__ import annotations

import ast
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import subprocess_env

from bergson_ray.testing.ray_head import end_process_group

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_example_compiles_and_has_a_docstring(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / f"{path.stem}.pyc"), doraise=True)
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path.name} needs a module docstring (what it shows, how to run it)"


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_python_api_example_runs(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="bex", dir="/tmp")  # short: Ray puts sockets under it
    # a private Ray under RAY_TMPDIR: never attach to another one on this machine
    env = subprocess_env(RAY_TMPDIR=ray_tmp)
    cmd = [sys.executable, str(EXAMPLES / "python_api.py"), "--out", str(tmp_path / "runs")]
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=560)
    except subprocess.TimeoutExpired:
        end_process_group(proc, ray_tmp)
        out, _ = proc.communicate()
        pytest.fail(f"examples/python_api.py ran over 560 s; its output ended with:\n{out[-4000:]}")
    finally:
        if proc.poll() is None:
            end_process_group(proc, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, f"exit code {proc.returncode}; output ended with:\n{out[-4000:]}"
    assert "Top 5 training rows" in out, out[-4000:]
    top = re.findall(r"^\s+[1-5]\. row +\d+\*? +cos [+-]\d\.\d{3}  \S", out, flags=re.M)
    assert len(top) == 5, f"expected 5 top rows with text, got {top}\n{out[-4000:]}"
    assert (tmp_path / "runs" / "scores" / "top_k.parquet").is_file()
