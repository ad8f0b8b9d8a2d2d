"""The config home: one coercion, defaults that survive any flag, help on every option."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Literal, get_args, get_origin

import pytest

from bergson_ray.cli.args import flags_for
from bergson_ray.cli.main import make_parser
from bergson_ray.config import (
    BuildConfig,
    EkfacRunConfig,
    HessianRunConfig,
    ScoreRunConfig,
    ServeConfig,
    as_config,
    from_dict,
)
from bergson_ray.config.coerce import default_instance, unwrap_optional
from bergson_ray.errors import BadInputError

COMMANDS = {
    "build": BuildConfig,
    "reduce": BuildConfig,
    "score": ScoreRunConfig,
    "hessian": HessianRunConfig,
    "ekfac": EkfacRunConfig,
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = make_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _leaves(cfg, prefix=""):
    for f in dataclasses.fields(cfg):
        val = getattr(cfg, f.name)
        if dataclasses.is_dataclass(val):
            yield from _leaves(val, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", val


def _other_value(tp, default):
    """A valid value different from ``default`` for a flag of type ``tp`` (as CLI text)."""
    base, _ = unwrap_optional(tp)
    if base is bool:
        return str(not default).lower()
    if get_origin(base) is Literal:
        others = [c for c in get_args(base) if c != default]
        return str(others[0]) if others else None
    if base is int:
        return str((default or 0) + 1)
    if base is float:
        return str((default or 0.0) + 0.5)
    if get_origin(base) is list:
        return "x,y"
    return "some_value"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_defaults_survive_any_single_flag(command, tmp_path):
    """Setting one flag changes that field only: the section it lives in keeps the
    *command's* defaults (``ekfac --seed 3`` still fits EK-FAC)."""
    cls = COMMANDS[command]
    parser = _subparsers()[command]
    default = dict(_leaves(default_instance(cls)))
    checked = 0
    for fl in flags_for(cls, skip=("run_path",)):
        value = _other_value(fl.type, fl.default)
        if value is None:
            continue
        ns = parser.parse_args([str(tmp_path / "run"), f"--{fl.flag}", value])
        module = __import__(f"bergson_ray.cli.{command}", fromlist=["config_from_args"])
        try:
            cfg = module.config_from_args(ns)
        except BadInputError:
            continue  # the value is invalid for this command (e.g. a combination it rejects)
        got = dict(_leaves(cfg))
        changed = {k for k in got if got[k] != default[k]} - {"run.run_path"}
        assert changed <= {fl.path}, f"--{fl.flag} {value} also changed {changed - {fl.path}}"
        checked += 1
    assert checked >= len(default) // 2


def test_ekfac_keeps_ev_correction_and_query_dataset_check(tmp_path):
    ns = _subparsers()["ekfac"].parse_args([str(tmp_path / "r"), "--seed", "3"])
    from bergson_ray.cli.ekfac import config_from_args

    cfg = config_from_args(ns)
    assert cfg.hessian.ev_correction is True and cfg.hessian.seed == 3
    ns = _subparsers()["ekfac"].parse_args([str(tmp_path / "r"), "--query.split", "test"])
    cfg = config_from_args(ns)
    assert cfg.query.dataset == "" and cfg.query.split == "test"


def test_ekfac_help_shows_the_commands_default(capsys):
    with pytest.raises(SystemExit):
        _subparsers()["ekfac"].parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Kronecker eigenbasis. (default: True)" in text


def test_python_api_nested_dict_and_flat_keywords_agree():
    a = as_config(EkfacRunConfig, {"hessian": {"seed": 5}}, run_path="x")
    b = as_config(EkfacRunConfig, None, seed=5, run_path="x")
    c = from_dict(EkfacRunConfig, {"hessian": {"seed": 5}, "run": {"run_path": "x"}})
    assert a == b == c and a.hessian.ev_correction is True
    d = as_config(EkfacRunConfig, None, **{"query.dataset": "q.jsonl"}, run_path="x")
    assert d.query.dataset == "q.jsonl" and d.data.dataset == "tiny"
    serve = as_config(ServeConfig, None, store="s", nprobe=4, name="n")
    assert serve.faiss.nprobe == 4 and serve.name == "n"


@pytest.mark.parametrize(
    "cls,data,match",
    [
        (BuildConfig, {"batch": {"token_batch_size": 1}}, "token_batch_size must be > 1"),
        (BuildConfig, {"grad": {"projection_dim": -1}}, "projection_dim"),
        (BuildConfig, {"ray": {"num_workers": -1}}, "num_workers"),
        (BuildConfig, {"ray": {"window_size": 0}}, "window_size"),
        (BuildConfig, {"grad": {"attribute_tokens": True}, "preprocess": {"aggregation": "mean"}}, "aggregation"),
        (ScoreRunConfig, {"score": {"top_k": -2}}, "top_k"),
        (HessianRunConfig, {"run": {"resume": True}}, "cannot --resume"),
        (EkfacRunConfig, {"hessian": {"method": "autocorrelation", "ev_correction": False}}, "factored"),
        (BuildConfig, {"grad": {"no_such_option": 1}}, "no_such_option"),
    ],
)
def test_every_way_of_making_a_config_validates(cls, data, match):
    with pytest.raises(BadInputError, match=match):
        from_dict(cls, data)
    flat = {}
    for section, values in data.items():
        for k, v in values.items():
            flat[f"{section}.{k}"] = v
    with pytest.raises(BadInputError, match=match):
        as_config(cls, None, **flat)


def test_cli_rejects_bad_values_in_one_sentence(capsys, tmp_path):
    from bergson_ray.cli.main import main

    assert main(["build", str(tmp_path / "r"), "--num_workers", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --num_workers must be >= 0 (0 = one per GPU)"]
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.part").exists()


def test_every_option_of_every_command_has_help():
    """``--help`` describes every option (not just ``(default: X)``) and uses plain
    metavars (never the internal ``CFG__...`` names)."""
    for name, sub in _subparsers().items():
        options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
        described = [a for a in options if a.help and not a.help.startswith("(default")]
        assert len(described) >= 0.9 * len(options), name
        assert all("CFG__" not in str(a.metavar) for a in options), name


def test_a_store_larger_than_the_disk_is_refused_before_anything_is_written(capsys, tmp_path):
    """``--projection_dim 100000`` would make a store of terabytes: one sentence naming its
    size and the free space, and no run directory (not even a ``.part``)."""
    from bergson_ray.cli.main import main
    from bergson_ray.store.files import check_room

    check_room(tmp_path, 1024, "a small file")  # fits: no error
    code = main(["build", str(tmp_path / "r"), "--projection_dim", "100000", "--truncation"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "would take" in err[0] and "TiB" in err[0] and "free" in err[0]
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.part").exists()


@pytest.mark.parametrize(
    "argv,named",
    [
        (["build", "{tmp}/r", "--dataset", "{tmp}/missing.jsonl"], "--dataset"),
        (["score", "{tmp}/r", "--query_path", "{tmp}/no_query"], "--query_path"),
        (["build", "{tmp}/r", "--model", "{tmp}/no_model_dir"], "--model"),
        (["ekfac", "{tmp}/r", "--query.dataset", "./missing/*.parquet"], "--query.dataset"),
        (["validate", "{tmp}/r", "--scores", "{tmp}/no_scores"], "--scores"),
        (["build", "{tmp}/r", "--num_workers", "-1"], "--num_workers"),
    ],
)
def test_argument_errors_come_first_and_fast(tmp_path, argv, named):
    """Argument-level mistakes are one line, before torch or Ray are imported; the time to
    the error is printed (a figure for the reader, not an assertion: machines differ)."""
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "bergson_ray", *(a.format(tmp=tmp_path) for a in argv)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
    print(f"time to first error for {' '.join(argv[:1] + argv[2:])}: {took:.2f}s")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: " + named)
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.part").exists()


def test_text_values_from_yaml_take_the_fields_type():
    """YAML reads ``1e-6`` as text and bergson writes lists as ``"a,b"``: a config made
    from a document still gets numbers, booleans and lists, or one sentence."""
    cfg = from_dict(BuildConfig, {"grad": {"label_smoothing": "1e-1", "projection_dim": "8",
                                           "include_bias": "true", "modules": "a,b"}})
    assert cfg.grad.label_smoothing == 0.1 and cfg.grad.projection_dim == 8
    assert cfg.grad.include_bias is True and cfg.grad.modules == ["a", "b"]
    with pytest.raises(BadInputError, match="--projection_dim expects an integer, got 'x'"):
        from_dict(BuildConfig, {"grad": {"projection_dim": "x"}})
