"""bergson 2.5.1 for the interop tests: where it lives, and one way to run it.

``bash scripts/bergson_anchor.sh`` installs bergson in its own venv under
``~/.cache/bergson-anchor`` (``BERGSON_ANCHOR_ROOT`` moves it), next to copies of our
tiny default model and corpus; bergson's cached CLI runs go to ``interop-runs/``.
Tests that need it are marked :data:`needs_anchor` (or :data:`needs_venv` when the
venv alone is enough) and skip, with the command to run, when it is absent.

:func:`run` starts ``bergson ...`` or ``python -c ...`` in that venv. By default the
commands run in forked children of one warm server process (``anchor_forkserver.py``)
that imports bergson once per test session: the import is ~8 s of a tiny run's ~10 s.
``BERGSON_ANCHOR_FORK=0`` runs each one as a fresh process instead.
``BERGSON_ANCHOR_REQUIRED=1`` (set by ``.ci/run``) turns a missing anchor into an error
instead of skipped tests.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("BERGSON_ANCHOR_ROOT", Path.home() / ".cache" / "bergson-anchor"))
PY = ROOT / "anchor-venv" / "bin" / "python"
BERGSON = ROOT / "anchor-venv" / "bin" / "bergson"
MODEL = ROOT / "models" / "tiny-neox-trained"
DATA = ROOT / "data"
RUNS = ROOT / "interop-runs"

INSTALLED = PY.exists() and BERGSON.exists()
READY = INSTALLED and (MODEL / "model.safetensors").exists()
_HOW = "run `bash scripts/bergson_anchor.sh` to enable these tests"
if os.environ.get("BERGSON_ANCHOR_REQUIRED") == "1" and not READY:  # CI: never skip them
    raise RuntimeError(f"BERGSON_ANCHOR_REQUIRED=1 but bergson is not installed under {ROOT}; {_HOW}")
needs_venv = pytest.mark.skipif(not INSTALLED, reason=f"no bergson venv under {ROOT}; {_HOW}")
needs_anchor = pytest.mark.skipif(
    not READY, reason=f"no bergson venv or tiny assets under {ROOT}; {_HOW}"
)

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "PYTHONWARNINGS": "ignore",
}


_CLI_COMMON = ["--model", str(MODEL), "--projection_dim", "16", "--truncation", "--overwrite", "true"]
_PYDOC = ["--dataset", str(DATA / "pydoc")]
_QUERY = ["--dataset", str(DATA / "pydoc_query"), "--split", "train[:3]"]
CLI_RUNS: dict[str, list[str]] = {
    "build_p16": ["build", *_PYDOC, "--split", "train[:40]", *_CLI_COMMON],
    "build_tokens": ["build", *_PYDOC, "--split", "train[:8]", "--attribute_tokens", "true", *_CLI_COMMON],
    "build_bf16": ["build", *_PYDOC, "--split", "train[:8]", "--precision", "bf16", *_CLI_COMMON],
    "query_p16": ["build", *_QUERY, *_CLI_COMMON],
    "reduce_mean": ["reduce", *_QUERY, "--aggregation", "mean", *_CLI_COMMON],
    "score_p16": [
        "score", "--query_path", "{RUNS}/query_p16", "--score", "individual",
        *_PYDOC, "--split", "train[:20]", *_CLI_COMMON,
    ],
    "score_bf16": [
        "score", "--query_path", "{RUNS}/query_p16", "--score_cfg.precision", "bf16",
        *_PYDOC, "--split", "train[:10]", *_CLI_COMMON,
    ],
    "score_tokens": [
        "score", "--query_path", "{RUNS}/query_p16", "--attribute_tokens", "true",
        *_PYDOC, "--split", "train[:6]", *_CLI_COMMON,
    ],
}  # fmt: skip
"""bergson's CLI runs that several test files read: name -> arguments after the run path
(a run's dependencies come before it)."""


def cli_runs(names: list[str] | None = None) -> dict[str, Path]:
    """The :data:`CLI_RUNS` named (default: all) under :data:`RUNS`, each made once by
    bergson and then cached. A cached run is reused only if it finished (``info.json``)
    and its stamp matches: the same arguments, the same tiny model file, and every run it
    reads reused too (editing an entry of :data:`CLI_RUNS` or re-making the assets
    re-runs what depends on it, instead of comparing against a stale run)."""
    RUNS.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    fresh: set[str] = set()
    for name, args in CLI_RUNS.items():
        if names is not None and name not in names and not _needed(name, names):
            continue
        path, stamp_file = RUNS / name, RUNS / f"{name}.stamp.json"
        stamp = _stamp(args)
        reads_fresh = any(f"{{RUNS}}/{dep}" in a for dep in fresh for a in args)
        cached = (path / "info.json").exists() and stamp_file.exists()
        if reads_fresh or not cached or json.loads(stamp_file.read_text()) != stamp:
            stamp_file.unlink(missing_ok=True)
            bergson_cli(name, args, path)
            stamp_file.write_text(json.dumps(stamp))
            fresh.add(name)
        out[name] = path
    return out


def _stamp(args: list[str]) -> dict:
    """What a cached run was made from: its arguments and the model file's size and age."""
    st = (MODEL / "model.safetensors").stat()
    return {"args": args, "model": [st.st_size, st.st_mtime_ns]}


def bergson_cli(name: str, args: list[str], out: Path) -> None:
    """``bergson args[0] out args[1:]`` (``{RUNS}`` expanded), its output logged next to
    ``out``; a failure fails the test with the log's tail."""
    log = out.with_name(f"{out.name}.log")
    argv = ["bergson", args[0], out, *(a.replace("{RUNS}", str(RUNS)) for a in args[1:])]
    proc = run(argv, cwd=RUNS, log=log)
    if proc.returncode != 0:
        pytest.fail(f"bergson {args[0]} for {name} failed (rc={proc.returncode}):\n"
                    f"{log.read_text()[-3000:]}")  # fmt: skip


def _needed(name: str, names: list[str]) -> bool:
    """Whether a run in ``names`` reads run ``name`` (``{RUNS}/name`` in its arguments)."""
    return any(f"{{RUNS}}/{name}" in a for n in names for a in CLI_RUNS[n])


def run(
    argv: list[str | Path],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    log: Path | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """``argv`` (``["bergson", ...]`` or ``["python", "-c", code, ...]``) in bergson's venv.

    Output goes to ``log`` (stdout and stderr together) when given, else it is captured
    in the result's ``stdout``/``stderr``. ``env`` defaults to :data:`ENV`. Raises
    ``subprocess.TimeoutExpired`` past ``timeout`` seconds, like ``subprocess.run``.
    """
    argv = [str(a) for a in argv]
    if argv[0] not in ("bergson", "python"):
        raise ValueError(f"run() takes ['bergson', ...] or ['python', '-c', ...], not {argv[:1]}")
    env = ENV if env is None else env
    cwd = str(cwd or tempfile.gettempdir())
    server = _server()
    if server is None:
        exe = str(BERGSON if argv[0] == "bergson" else PY)
        if log is None:
            return subprocess.run([exe, *argv[1:]], capture_output=True, text=True, env=env,
                                  cwd=cwd, timeout=timeout)  # fmt: skip
        with log.open("w") as f:
            return subprocess.run([exe, *argv[1:]], stdout=f, stderr=subprocess.STDOUT,
                                  text=True, env=env, cwd=cwd, timeout=timeout)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = str(log) if log is not None else os.path.join(tmp, "stdout")
        err = out if log is not None else os.path.join(tmp, "stderr")
        rc = server.run(dict(argv=argv, env=dict(env), cwd=cwd, stdout=out, stderr=err), timeout)
        if log is not None:
            return subprocess.CompletedProcess(argv, rc)
        return subprocess.CompletedProcess(
            argv, rc, Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace")
        )


class _ForkServer:
    """The warm process of ``anchor_forkserver.py``; one request at a time."""

    def __init__(self) -> None:
        script = Path(__file__).with_name("anchor_forkserver.py")
        self.log = Path(tempfile.gettempdir()) / f"bergson-anchor-forkserver-{os.getpid()}.log"
        with self.log.open("w") as f:
            self.proc = subprocess.Popen([str(PY), str(script)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=f, text=True, env=ENV,
                                         cwd=tempfile.gettempdir())  # fmt: skip
        self.lock = threading.Lock()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        atexit.register(self.close)

    def _reply(self, timeout: float | None) -> dict:
        if not self.selector.select(timeout):
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the bergson fork server died; see {self.log}")
        return json.loads(line)

    def run(self, req: dict, timeout: float) -> int:
        with self.lock:
            pid = None
            try:
                self.proc.stdin.write(json.dumps(req) + "\n")
                self.proc.stdin.flush()
                pid = self._reply(120)["pid"]  # the first request also waits for the import
                return self._reply(timeout)["rc"]
            except TimeoutError:
                self.kill(pid)
                raise subprocess.TimeoutExpired(req["argv"], timeout) from None
            except BaseException:  # e.g. pytest-timeout's interrupt: replies would go astray
                self.kill(pid)
                raise

    def kill(self, pid: int | None) -> None:
        """End the running child (its process group) and this server: the next
        :func:`run` starts a fresh one."""
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)  # the child and whatever it started
            except ProcessLookupError:
                pass
        self.proc.kill()
        self.proc.wait()
        _SERVER.clear()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_SERVER: list[_ForkServer | None] = []


def _server() -> _ForkServer | None:
    """The session's fork server, started on first use (None: run fresh processes)."""
    if not _SERVER:
        use = INSTALLED and os.environ.get("BERGSON_ANCHOR_FORK", "1") != "0"
        _SERVER.append(_ForkServer() if use else None)
    return _SERVER[0]
