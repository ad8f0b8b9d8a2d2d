"""Parity of ``bergson-ray train`` with bergson 2.5.1's ``bergson train``.

bergson runs in its own venv (``~/.cache/bergson-anchor/anchor-venv``) through
subprocesses; its runs are cached under ``~/.cache/bergson-anchor/interop-runs``
(``train_*``), so only the first session pays for them. Skipped, with the reason, when
the anchor venv or its tiny model is absent (``bash
scripts/bergson_anchor.sh`` creates them).

What is compared: final parameters (fp32 tolerance) for AdamW, SGD and Muon runs that
exercise padding of the last batch, two shuffled epochs, warmup + cosine, gradient
clipping and accumulation; the second moments in ``optimizer.pt``; the learning-rate
history; and, through bergson's own functions, the lr schedules, the checkpoint
schedules and the shuffled, padded batch order.
"""

from __future__ import annotations

import functools
import json
import textwrap
from pathlib import Path

import anchor
import pytest
import torch
from anchor import ROOT, RUNS, needs_venv
from safetensors.torch import load_file

from bergson_ray.cli import metasmoothness as metasmoothness_cli
from bergson_ray.cli import train as train_cli
from bergson_ray.cli.main import _guarded
from bergson_ray.config.training import SCHEDULES, LRScheduleConfig
from bergson_ray.training import batch_order, checkpoint_steps, lr_schedule

# the trained tiny model, else the untrained one (either will do for parity)
MODELS = [ROOT / "models" / "tiny-neox-trained", ROOT / "models" / "tiny-neox"]
MODEL = next((m for m in MODELS if (m / "model.safetensors").exists()), MODELS[0])
DATA = anchor.DATA / "pydoc"

pytestmark = [
    needs_venv,
    pytest.mark.skipif(
        not (MODEL / "model.safetensors").exists(),
        reason=(
            f"no tiny model under {ROOT / 'models'}; run "
            "`bash scripts/bergson_anchor.sh` to compare with bergson"
        ),
    ),
]

_COMMON = [
    "--dataset", str(DATA), "--split", "train[:10]", "--truncation", "true",
    "--batch_size", "4", "--save_mode", "final", "--save_models", "true",
]  # fmt: skip
# name -> flags both programs take (10 docs, batch 4: the last batch has 2 pad rows)
TRAIN_RUNS: dict[str, list[str]] = {
    "adamw": ["--lr", "1e-3", "--save_optimizer_state", "last"],
    "sgd": [
        "--optimizer", "sgd", "--lr", "0.05", "--num_epochs", "2",
        "--lr_scheduler_type", "cosine", "--warmup_steps", "0.25",
    ],
    "muon": [
        "--optimizer", "muon", "--lr", "1e-3", "--max_grad_norm", "0.5",
        "--grad_accum_steps", "2", "--weight_decay", "0.1",
    ],
}  # fmt: skip


_PROBE = ["--dataset", str(DATA), "--split", "train[:10]", "--truncation", "true",
          "--batch_size", "4", "--lr", "1e-3", "--fd_step", "0.5", "--direction_seed", "3"]  # fmt: skip


def _bergson_run(name: str, command: str = "train") -> Path:
    """bergson's run for ``name`` (cached: a run with its final output is done)."""
    out = RUNS / f"{command}_{MODEL.name}_{name}"
    done = "metasmoothness.json" if command == "metasmoothness" else "model/model.safetensors"
    if (out / done).exists():
        return out
    RUNS.mkdir(parents=True, exist_ok=True)
    flags = _PROBE if command == "metasmoothness" else [*_COMMON, *TRAIN_RUNS[name]]
    cmd = ["bergson", command, str(out), "--model", str(MODEL), *flags,
           "--wandb_project", "", "--overwrite", "true"]  # fmt: skip
    log = RUNS / f"{out.name}.log"
    proc = anchor.run(cmd, cwd=RUNS, log=log)
    if proc.returncode != 0:
        pytest.fail(f"bergson {command} {name} failed (rc={proc.returncode}):\n{log.read_text()[-3000:]}")
    return out


def cli_main(argv: list[str]) -> int:
    """``bergson-ray train|metasmoothness ...`` in process (their parsers, main()'s guard)."""
    import argparse

    parser = argparse.ArgumentParser(prog="bergson-ray")
    sub = parser.add_subparsers(dest="command")
    train_cli.add_parser(sub)
    metasmoothness_cli.add_parser(sub)
    args = parser.parse_args(argv)
    return _guarded(lambda: args.func(args))


def _anchor(script: str) -> object:
    """Run ``script`` in bergson's venv; its last stdout line is JSON."""
    proc = anchor.run(["python", "-c", textwrap.dedent(script)])
    if proc.returncode != 0:
        pytest.fail(f"anchor script failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@functools.cache
def _bergson_threads() -> int:
    """The torch thread count bergson's runs use (torch's default, in the fork server).

    Ours runs on the same count: on AVX-512 CPUs MKL splits long reductions across
    threads, so two thread counts differ in last bits, which Adam amplifies."""
    return int(_anchor("import json, torch; print(json.dumps(torch.get_num_threads()))"))


@pytest.mark.parametrize("name", list(TRAIN_RUNS))
def test_final_parameters_match_bergson(name, tmp_path):
    theirs = _bergson_run(name)
    ours = tmp_path / "run"
    flags = [*_COMMON, *TRAIN_RUNS[name], "--torch_threads", str(_bergson_threads())]
    assert cli_main(["train", str(ours), "--model", str(MODEL), *flags]) == 0
    # both save through the same transformers (checkpoint key names, e.g. embed_out)
    a = load_file(str(ours / "model" / "model.safetensors"))
    b = load_file(str(theirs / "model" / "model.safetensors"))
    # bergson's swapped-in state also saves the rotary buffers (inv_freq); params agree
    assert a.keys() <= b.keys() and all("inv_freq" in k for k in b.keys() - a.keys())
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - load_file(str(MODEL / "model.safetensors"))[k]).abs().max()) for k in a)
    assert moved > 1e-4, "training did not move the parameters"
    for k in a:
        # Adam's first steps are ~lr * sign(g): an element whose true gradient is ~0 moves
        # by up to lr in a direction set by rounding noise, which differs between any two
        # implementations. The attention key bias is all such elements (softmax ignores
        # it): up to 1e-4 there (observed 4.5e-5 at lr 1e-3). Elsewhere every element is
        # within 1e-5 and all but one in 1e5 within fp32 tolerance (observed: one of
        # 2.9M elements at 3e-6 for AdamW on the trained model; SGD and Muon < 1e-6).
        diff = (a[k] - b[k]).abs()
        if k.endswith("query_key_value.bias"):
            assert float(diff.max()) <= 1e-4, k
            continue
        off = int((diff > 1e-6 + 1e-5 * b[k].abs()).sum())
        assert float(diff.max()) <= 1e-5 and off <= max(1, diff.numel() // 100_000), (
            f"{k}: {off} elements off, worst {float(diff.max())} (overall {worst})"
        )

    lr_ours = json.loads((ours / "checkpoints" / "log_history.json").read_text())
    lr_theirs = json.loads((theirs / "checkpoints" / "log_history.json").read_text())
    assert [h["step"] for h in lr_ours] == [h["step"] for h in lr_theirs]
    for x, y in zip(lr_ours, lr_theirs):
        assert x["learning_rate"] == pytest.approx(y["learning_rate"], rel=1e-12, abs=1e-15)

    if (theirs / "optimizer.pt").exists():
        mine = torch.load(ours / "optimizer.pt", weights_only=True)
        ref = torch.load(theirs / "optimizer.pt", weights_only=True)
        assert mine["state"].keys() == ref["state"].keys()
        assert mine["param_groups"] == [{"params": list(ref["state"])}] == ref["param_groups"]
        for idx, entry in ref["state"].items():
            assert mine["state"][idx]["param_name"] == entry["param_name"]
            torch.testing.assert_close(
                mine["state"][idx]["exp_avg_sq"], entry["exp_avg_sq"], atol=1e-9, rtol=1e-4
            )


def test_schedules_and_batch_order_match_bergson():
    cases = [
        dict(lr_scheduler_type=t, lr=1e-3, lr_start=1e-5, lr_end=1e-4, warmup_steps=w,
             num_cycles=c, power=2.0)
        for t in SCHEDULES for w in (0, 3, 0.3) for c in (0.5, 1.7)
    ]  # fmt: skip
    ref = _anchor(
        f"""
        import json, math
        import numpy as np
        from datasets import Dataset
        from bergson.config.config import LRScheduleConfig
        from bergson.magic.trainer import next_save_index
        from bergson.magic.cli import shuffled_epochs
        from bergson.magic.data_stream import pad_dataset_to_batch_size
        lrs = [[LRScheduleConfig(**c).get_schedule(17)(i) for i in range(17)]
               for c in {cases!r}]
        saves = {{}}
        for n in (1, 2, 7, 10, 16, 50):
            for mode, iv in (("all", 0), ("sqrt", 0), ("log", 0), ("final", 0),
                             ("interval", 3), ("interval", 5)):
                out, nxt = [], n if mode == "final" else 0
                for i in range(n):
                    if i == nxt:
                        out.append(i)
                        nxt = next_save_index(nxt, n, mode, iv)
                if mode in ("interval", "final") and nxt == n:
                    out.append(n)
                saves[f"{{n}}/{{mode}}/{{iv}}"] = out
        ds = shuffled_epochs(Dataset.from_dict({{"i": list(range(11))}}), 7, 3)
        ds, _, pad = pad_dataset_to_batch_size(ds, 4, 33, "x", 1)
        print(json.dumps({{"lrs": lrs, "saves": saves, "order": list(ds["i"]),
                           "pad": pad.num_rows}}))
        """
    )
    for case, want in zip(cases, ref["lrs"]):
        got = [lr_schedule(LRScheduleConfig(**case), 17)(i) for i in range(17)]
        assert got == pytest.approx(want, rel=1e-12, abs=1e-18), case
    for key, want in ref["saves"].items():
        n, mode, iv = key.split("/")
        assert checkpoint_steps(int(n), mode, int(iv)) == want, key
    batches = batch_order(11, 4, 3, seed=7)
    assert [r for b in batches for r in b.rows] == ref["order"]
    assert sum(b.pad for b in batches) == ref["pad"] == 3


def test_metasmoothness_matches_bergson(tmp_path):
    """Same direction v, same three trainings: same score and movement."""
    theirs = json.loads((_bergson_run("probe", "metasmoothness") / "metasmoothness.json").read_text())
    ours_dir = tmp_path / "probe"
    assert cli_main(["metasmoothness", str(ours_dir), "--model", str(MODEL), *_PROBE]) == 0
    ours = json.loads((ours_dir / "metasmoothness.json").read_text())
    assert ours.keys() == theirs.keys()
    assert ours["fd_step"] == theirs["fd_step"] and ours["direction_seed"] == 3
    assert ours["total_movement_l1"] == pytest.approx(theirs["total_movement_l1"], rel=1e-3)
    assert ours["score"] == pytest.approx(theirs["score"], abs=0.02)
