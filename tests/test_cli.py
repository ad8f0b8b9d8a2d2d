"""The command line: every command parses bergson's flags; the quickstart runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env

from bergson_ray.cli.main import COMMANDS, make_parser

ROOT = Path(__file__).resolve().parents[1]


def test_every_registered_command_has_help(capsys):
    parser = make_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"build", "reduce", "score", "quickstart"} <= set(sub.choices)
    for name in sub.choices:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0
        assert name in COMMANDS


def test_bergson_style_flags_parse_into_the_config():
    from bergson_ray.cli.build import config_from_args

    args = make_parser().parse_args(
        ["build", "runs/x", "--model", "m", "--dataset", "d.jsonl", "--projection_dim", "16",
         "--truncation", "--overwrite", "true", "--include_bias", "false", "--filter_modules",
         "*mlp*", "--split_attention_modules", "a,b", "--num_workers", "3"]
    )
    cfg = config_from_args(args)
    assert cfg.run.run_path == "runs/x" and cfg.run.overwrite
    assert cfg.model.model == "m" and cfg.data.dataset == "d.jsonl" and cfg.data.truncation
    assert cfg.grad.projection_dim == 16 and not cfg.grad.include_bias
    assert cfg.grad.filter_modules == "*mlp*" and cfg.grad.split_attention_modules == ["a", "b"]
    assert cfg.ray.num_workers == 3


def test_user_errors_print_one_line_not_a_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "bergson_ray", "build", str(tmp_path / "x"), "--model",
         str(tmp_path / "missing-model")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 2
    assert "missing-model' does not exist" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.ray
def test_quickstart_end_to_end(tmp_path, tiny_assets):
    """The README's first command: builds an index on a local Ray and prints the top 5."""
    env = subprocess_env()
    out = subprocess.run(
        [sys.executable, "-m", "bergson_ray", "quickstart", "--run_path", str(tmp_path / "qs"),
         "--split", "train[:300]"],  # the README's command, on a slice: CI time
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("query:") == 2
    assert out.stdout.count("  5. row") == 2
    assert (tmp_path / "qs" / "index" / "info.json").exists()


EXIT_NOW = """
import atexit, sys, threading, time
from bergson_ray.cli.main import exit_now
out = sys.argv[1]
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
if sys.argv[2] == "thread":  # a non-daemon thread still working: wait for it
    threading.Thread(target=lambda: (time.sleep(0.5), open(out + ".thread", "w").write("done"))).start()
sys.stdout.write("x" * 200_000)  # buffered, not yet flushed
exit_now(3)
"""


@pytest.mark.parametrize("mode", ["plain", "thread", "profiled"])
def test_the_fast_exit_loses_nothing(tmp_path, mode):
    """``exit_now`` skips the interpreter's teardown, but not the atexit handlers (Ray's
    shutdown), buffered output, the exit code, a thread that is still writing, or a
    profiler's output (written after the program returns)."""
    script = tmp_path / "exit_now.py"
    script.write_text(EXIT_NOW)
    prof = tmp_path / "run.prof"
    runner = ["-m", "cProfile", "-o", str(prof)] if mode == "profiled" else []
    out = subprocess.run(
        [sys.executable, *runner, str(script), str(tmp_path / "f"), mode],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == (0 if mode == "profiled" else 3), out.stderr[-2000:]  # cProfile: 0
    assert out.stdout.startswith("x" * 200_000)
    assert (tmp_path / "f.atexit").read_text() == "ran"
    if mode == "thread":
        assert (tmp_path / "f.thread").read_text() == "done"
    if mode == "profiled":
        assert prof.stat().st_size > 0


def test_a_command_line_builds_only_its_commands_parser():
    """Start-up: ``bergson-ray build ...`` imports the build command's module, not the
    other 21; a misspelt command still lists them all."""
    code = (
        "import sys, contextlib, io\n"
        "from bergson_ray.cli.main import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--log_level', 'WARNING', 'build', '--help'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('bergson_ray.cli.') and\n"
        "             m.split('.')[-1] in __import__('bergson_ray.cli.main').cli.main.COMMANDS))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['bergson_ray.cli.build']"
    typo = subprocess.run([sys.executable, "-m", "bergson_ray", "buidl"], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert typo.returncode == 2 and "'trak'" in typo.stderr and "'build'" in typo.stderr
