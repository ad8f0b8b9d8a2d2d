"""What does collecting per-example gradients during training cost? (HF Trainer callback)

Trains the tiny default model (4 layers, width 128, vocab 4096) on 128-token windows of
the tiny corpus with the HF ``Trainer`` (AdamW, batch 8, ``--steps`` steps), and times
every optimizer step (``on_step_end`` to ``on_step_end``, so data loading and every
callback are inside). Variants, each its own process, run interleaved ``--rounds`` times:

* ``plain``          the Trainer alone (our venv)
* ``ours``           + ``bergson_ray.GradientCollectorCallback`` (p=16, Adam-normalized)
* ``ours_raw``       + the same with ``use_optimizer_state=False``
* ``bergson_plain``  the Trainer alone in bergson's venv (same torch/transformers)
* ``bergson``        + bergson 2.5.1's ``GradientCollectorCallback`` (its defaults)
* ``bergson_raw``    + the same with ``use_optimizer_state=False``

and prints the median step time of each and the overhead against its venv's plain run
(target: <= 10 %), in process CPU time (each run uses ``--threads`` threads, 1 by default,
so CPU time is the step's cost even on a machine shared with other jobs) and in wall time,
pooled over rounds and, in brackets, per round against that round's plain run (the runs
of one round are minutes apart, so a drifting load disturbs that ratio less) with the
median of the rounds. The bergson variants need the anchor venv (skipped without it).
Adam-normalized rows need each example's full ``[O, I]`` gradient before projecting
(the normalizer is elementwise), which costs about as much as the backward pass's own
weight gradients; without the optimizer state, rows are two-sided projections of the
taps and cost little.

    python benchmarks/callback_overhead.py [--steps 64] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ = 128
BATCH = 8
VARIANTS = ("plain", "ours", "ours_raw", "bergson_plain", "bergson", "bergson_raw")


# --------------------------------------------------------------------------- worker side
def worker(variant: str, model_dir: str, rows_path: str, steps: int, out_dir: str) -> dict:
    """One training run; returns the per-step seconds. Imports nothing of bergson_ray
    unless the variant is ours (it also runs in bergson's venv)."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    rows = np.load(rows_path)[: steps * BATCH]
    ds = Dataset.from_dict({"input_ids": rows.tolist()})

    def collate(features):
        ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, float]] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), time.process_time()))

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(Path(out_dir) / "trainer"), per_device_train_batch_size=BATCH,
        num_train_epochs=1, max_steps=steps, learning_rate=1e-4, optim="adamw_torch",
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    callbacks = []
    store = Path(out_dir) / "grads"
    raw = variant.endswith("_raw")
    if variant.startswith("ours"):
        import bergson_ray

        callbacks.append(bergson_ray.GradientCollectorCallback(
            store, projection_dim=16, use_optimizer_state=not raw, overwrite=True))
        prepare = bergson_ray.prepare_for_gradient_collection
    elif variant in ("bergson", "bergson_raw"):
        from bergson.huggingface import GradientCollectorCallback, prepare_for_gradient_collection

        callbacks.append(GradientCollectorCallback(store, projection_dim=16,
                                                   use_optimizer_state=not raw))
        prepare = prepare_for_gradient_collection
    else:
        prepare = None
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate,
                      callbacks=[*callbacks, timer])  # the timer's on_step_end runs last
    if prepare is not None:
        prepare(trainer)
    trainer.train()
    pairs = list(zip(timer.marks, timer.marks[1:]))
    return {"variant": variant, "wall": [b[0] - a[0] for a, b in pairs],
            "cpu": [b[1] - a[1] for a, b in pairs]}


# --------------------------------------------------------------------------- driver side
def make_rows(n: int) -> tuple[str, str]:
    """The tiny model's dir and ``n`` windows of SEQ tokens of the tiny corpus (.npy)."""
    import numpy as np
    from datasets import load_from_disk

    from bergson_ray.defaults.tiny import ensure_tiny_assets, load_tiny_tokenizer

    assets = ensure_tiny_assets()
    tok = load_tiny_tokenizer(assets)
    texts = load_from_disk(str(assets.corpus_dir))["text"]
    stream: list[int] = []
    for t in texts:
        stream += tok(t)["input_ids"] + [tok.eos_token_id or 0]
        if len(stream) >= n * SEQ:
            break
    while len(stream) < n * SEQ:  # a small corpus repeats
        stream += stream
    rows = np.asarray(stream[: n * SEQ], dtype=np.int64).reshape(n, SEQ)
    path = Path(tempfile.mkdtemp(prefix="callback_overhead_")) / "rows.npy"
    np.save(path, rows)
    return str(assets.model_dir), str(path)


def run_variant(variant: str, model_dir: str, rows: str, steps: int, threads: int) -> dict:
    from _harness import ANCHOR_VENV

    py = str(ANCHOR_VENV / "bin" / "python") if variant.startswith("bergson") else sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory(prefix=f"cb_{variant}_") as out:
        cmd = [py, __file__, "--worker", variant, "--model_dir", model_dir, "--rows", rows,
               "--steps", str(steps), "--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model_dir", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(worker(args.worker, args.model_dir, args.rows, args.steps, args.out)))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from _harness import ANCHOR_VENV

    variants = [v for v in args.variants.split(",") if v]
    if not (ANCHOR_VENV / "bin" / "python").exists():
        variants = [v for v in variants if not v.startswith("bergson")]
        print("bergson's anchor venv not found: bergson variants skipped")
    model_dir, rows = make_rows(args.steps * BATCH)
    try:
        measure(args, variants, model_dir, rows)
    finally:
        shutil.rmtree(Path(rows).parent, ignore_errors=True)


def measure(args: argparse.Namespace, variants: list[str], model_dir: str, rows: str) -> None:
    from _harness import cpu_busy_percent

    print(f"tiny model, batch {BATCH} x {SEQ} tokens, {args.steps} steps, "
          f"{args.rounds} interleaved rounds, {args.threads} thread(s); "
          f"machine busy {cpu_busy_percent():.0f}% before start")
    times = {clock: {v: [] for v in variants} for clock in ("cpu", "wall")}
    per_round = {clock: {v: [] for v in variants} for clock in ("cpu", "wall")}
    for r in range(args.rounds):
        for v in variants:
            res = run_variant(v, model_dir, rows, args.steps, args.threads)
            for clock in times:
                times[clock][v] += res[clock][2:]  # the first steps warm caches up
                per_round[clock][v].append(statistics.median(res[clock][2:]))
            print(f"  round {r + 1} {v:>14}: median cpu {per_round['cpu'][v][-1] * 1e3:7.1f}"
                  f" ms, wall {per_round['wall'][v][-1] * 1e3:7.1f} ms")
    for clock in ("cpu", "wall"):
        med = {v: statistics.median(t) for v, t in times[clock].items()}
        print(f"\nmedian step ({clock} time)  overhead vs plain of its venv   "
              "[per round: vs that round's plain run; median of rounds]")
        for v in variants:
            base = "bergson_plain" if v.startswith("bergson") else "plain"
            over = (med[v] / med[base] - 1) * 100 if base in med and v != base else None
            extra = f"{over:+6.1f} %" if over is not None else "   -"
            if over is not None:
                # A round's runs are minutes apart, so the load they shared varies less
                # than across rounds: the paired ratio is the steadier figure on a busy host.
                paired = [(a / b - 1) * 100 for a, b in
                          zip(per_round[clock][v], per_round[clock][base])]
                extra += (f"   [{' '.join(f'{x:+.1f}' for x in paired)}; "
                          f"median {statistics.median(paired):+.1f} %]")
            print(f"{v:>14}   {med[v] * 1e3:8.1f} ms   {extra}")


if __name__ == "__main__":
    main()
