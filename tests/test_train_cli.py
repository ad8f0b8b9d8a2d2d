"""``bergson-ray train``: a complete run directory, and bad input as one sentence."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from bergson_ray.cli import train as train_cli
from bergson_ray.cli.main import COMMANDS, _guarded
from bergson_ray.config.sections import DataConfig, ModelConfig
from bergson_ray.config.training import TrainingConfig
from bergson_ray.training import load_tokenized, make_model, train
from bergson_ray.training.export import load_checkpoint
from bergson_ray.training.model import max_model_length

SPLIT = "train[:10]"
FLAGS = ["--model", "tiny", "--dataset", "tiny", "--split", SPLIT, "--truncation",
         "--batch_size", "4", "--lr", "1e-3", "--torch_threads", "1"]  # fmt: skip


def run_cli(argv: list[str]) -> int:
    """``bergson-ray train ...`` in process: the command's parser, main()'s error guard."""
    parser = argparse.ArgumentParser(prog="bergson-ray")
    train_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return _guarded(lambda: args.func(args))


def test_train_writes_a_complete_run(tmp_path):
    run = tmp_path / "run"
    assert run_cli(["train", str(run), *FLAGS, "--save_mode", "all"]) == 0
    assert not (tmp_path / "run.part").exists()
    for rel in ["config.yaml", "summary.json", "optimizer.pt", "optimizer_state.safetensors",
                "model/config.json", "model/model.safetensors", "model/tokenizer.json",
                "checkpoints/log_history.json"]:  # fmt: skip
        assert (run / rel).is_file(), rel
    steps = sorted(p.name for p in (run / "checkpoints").glob("step_*.ckpt"))
    assert steps == ["step_0.ckpt", "step_1.ckpt", "step_2.ckpt"]  # 10 docs / 4: 3 steps
    history = json.loads((run / "checkpoints" / "log_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["documents"] == 10

    # the run dir holds exactly what the Python API computes
    model, tok = make_model(ModelConfig(model="tiny"))
    data = load_tokenized(
        DataConfig(split=SPLIT, truncation=True), tok, max_length=max_model_length(model, tok)
    )
    cfg = TrainingConfig(batch_size=4, save_mode="all", torch_threads=1)
    cfg.lr_schedule.lr = 1e-3
    want = train(model, data, cfg).params
    reloaded, _ = make_model(ModelConfig(model=str(run / "model")))
    saved = dict(reloaded.named_parameters())
    assert all(torch.equal(saved[k], want[k]) for k in want)
    first, state = load_checkpoint(run / "checkpoints" / "step_0.ckpt")
    assert state["step"] == 0 and torch.equal(first["gpt_neox.embed_in.weight"],
                                              dict(model.named_parameters())["gpt_neox.embed_in.weight"])  # fmt: skip

    # our own --optimizer_state reader accepts the run directory
    from bergson_ray.gradients.normalizers import load_optimizer_normalizers

    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    norms = load_optimizer_normalizers(str(run), model, mods, include_bias=True)
    assert set(norms) == set(mods)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--lr", "-1"], "--lr must be"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
        (["--save_mode", "interval"], "--save_interval"),
        (["--grad_accum_steps", "0"], "--grad_accum_steps"),
    ],
)
def test_bad_input_is_one_sentence(tmp_path, capsys, extra, words):
    assert run_cli(["train", str(tmp_path / "r"), *FLAGS, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "Traceback" not in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "r").exists()


def test_unknown_optimizer_is_rejected_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["train", str(tmp_path / "r"), *FLAGS, "--optimizer", "adagrad"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'adagrad'" in err and "Traceback" not in err


def test_existing_run_needs_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("old")
    assert run_cli(["train", str(run), *FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert (run / "keep.txt").exists()
    flags = [*FLAGS, "--save_mode", "final", "--save_models", "false"]
    assert run_cli(["train", str(run), *flags, "--overwrite"]) == 0
    assert not (run / "keep.txt").exists() and not (run / "model").exists()
    assert (run / "checkpoints" / "step_3.ckpt").is_dir()  # final: the trained state


def test_metasmoothness_cli_writes_its_json(tmp_path):
    from bergson_ray.cli import metasmoothness as probe_cli

    parser = argparse.ArgumentParser(prog="bergson-ray")
    probe_cli.add_parser(parser.add_subparsers(dest="command"))
    run = tmp_path / "probe"
    args = parser.parse_args(["metasmoothness", str(run), *FLAGS, "--split", "train[:6]"])
    assert _guarded(lambda: args.func(args)) == 0
    out = json.loads((run / "metasmoothness.json").read_text())
    assert set(out) == {"score", "fd_step", "direction_seed", "total_movement_l1"}
    assert -1.0 <= out["score"] <= 1.0 and out["fd_step"] == 0.1


def test_registered_in_main():
    if not {"train", "metasmoothness"} <= COMMANDS.keys():
        pytest.skip("cli/main.py COMMANDS lacks 'train'/'metasmoothness' (the lead adds them)")
    from bergson_ray.cli.main import make_parser

    args = make_parser().parse_args(["train", "r", "--lr", "0.1"])
    assert args.func == train_cli.run
