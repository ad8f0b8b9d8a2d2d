"""Throughput and peak memory of ``build`` (or ``reduce``) at p=16 on 1000 x 256-token documents.

``--projection_dim 0`` measures whole gradient rows instead (what both CLIs do by
default): the run is then bound by writing the store.

Runs ``bergson-ray build`` with one worker (by default in its own process, no Ray),
one worker on a Ray pool (``--executor ray``) and 2 Ray workers and, when the anchor venv exists
(``bash scripts/bergson_anchor.sh``), ``bergson build`` on the same
model and data; runs alternate so a busy machine affects both. Prints tokens/s
end to end (process start to exit) and in the gradient loop alone (the tqdm bar:
excludes imports, Ray start-up and model loading), peak RSS of the whole process
tree, and bergson_ray / bergson ratios. ``--command reduce`` measures ``reduce``
(``--aggregation mean``) the same way against ``bergson reduce``.

    python benchmarks/build_throughput.py [--command build] [--docs 1000] [--tokens 256]
                                          [--reps 1] [--workers 1,ray1,2] [--projection_dim 16]
                                          [--model tiny] [--token_batch_size 512]

``--model pythia-14m`` measures a model of Pythia-14M's shape (the tiny default's width, a
50,304-token vocabulary), where the LM head and its logits dominate a step.

``--workers``: comma-separated variants; ``N`` is ``--num_workers N`` as a user types it
(1 runs in process), ``rayN`` forces a Ray pool of N (``--executor ray``) on a private
Ray the command starts, ``headN`` a Ray pool of N that joins a running head, as README's
"Keeping Ray up between commands" describes: the benchmark starts a loopback head once,
runs one unmeasured command on it (Ray Data's helper actors outlive a job there, so
only the first command pays for them) and counts the head's processes in peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import (  # noqa: E402
    bergson_cli,
    cpu_busy_percent,
    head_roots,
    run_timed,
    tqdm_seconds,
    tree_rss_mib,
)
from _models import model_path  # noqa: E402

from bergson_ray.testing.ray_head import LocalHead  # noqa: E402
from bergson_ray.utils.ray_env import LOOPBACK_ENV, loopback_env  # noqa: E402

ENV = {**LOOPBACK_ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}  # fmt: skip


def prepare(docs: int, tokens: int, root: Path, model: str = "tiny") -> tuple[str, str]:
    """(model dir, corpus dir): ``model`` as ``_models.model_path`` reads it."""
    from bergson_ray.defaults.tiny import make_long_corpus

    data = root / f"long_{docs}x{tokens}"
    if not data.exists():
        make_long_corpus(docs, tokens).save_to_disk(str(data))
    return model_path(model, root), str(data)


def command_args(command: str, projection_dim: int, token_batch_size: int = 512) -> list[str]:
    """The flags both tools get: p (0: whole gradients, both CLIs' default), truncation,
    the token batch; reduce takes a mean."""
    args = ["--projection_dim", str(projection_dim), "--truncation",
            "--token_batch_size", str(token_batch_size)]  # fmt: skip
    return args + (["--aggregation", "mean"] if command == "reduce" else [])


def parse_variant(v: str) -> tuple[str, int]:
    """``"ray2"`` -> ``("ray", 2)``; ``""`` for a plain worker count."""
    m = re.fullmatch(r"(ray|head)?(\d+)", v)
    if not m:
        raise ValueError(f"--workers: {v!r} is not N, rayN or headN")
    return m.group(1) or "", int(m.group(2))


def ours(command: str, flags: list[str], model: str, data: str, out: Path, variant: str,
         head: LocalHead | None) -> dict:
    exe = Path(sys.executable).with_name("bergson-ray")
    kind, workers = parse_variant(variant)
    cmd = [str(exe), command, str(out), "--model", model, "--dataset", data, *flags,
           "--num_workers", str(workers), "--overwrite"]  # fmt: skip
    env = dict(ENV)
    if kind:
        cmd += ["--executor", "ray"]
    if kind == "head":
        env["RAY_ADDRESS"] = head.address
    r = run_timed(cmd, env, also=head_roots(head) if kind == "head" else ())
    summary = json.loads((out / "summary.json").read_text()) if r["rc"] == 0 else {}
    r["tokens"] = summary.get("tokens")
    # the progress bar starts before Ray Data launches the actors (torch import, model
    # load); the workers' own busy time is the figure comparable to bergson's loop.
    # With W workers in parallel the loop lasts about busy / W.
    busy = summary.get("worker_compute_seconds")
    r["loop"] = busy / workers if busy else tqdm_seconds(r, command)
    r["startup"] = summary.get("startup", {})
    r["driver_bytes"] = summary.get("driver_bytes_per_row")
    return r


def variant_name(v: str) -> str:
    kind, n = parse_variant(v)
    workers = f"{n} worker{'s' * (n > 1)}"
    if kind == "ray":
        return f"Ray pool, {workers}"
    if kind == "head":
        return f"Ray pool, {workers}, joined head"
    return "1 worker, in process" if n == 1 else f"{n} workers (Ray)"


def theirs(command: str, flags: list[str], model: str, data: str, out: Path) -> dict:
    cmd = [str(bergson_cli()), command, str(out), "--model", model, "--dataset", data,
           *flags, "--overwrite", "true"]  # fmt: skip
    r = run_timed(cmd, ENV)
    r["loop"] = tqdm_seconds(r, "Computing")
    return r


def line(name: str, r: dict, tokens: int) -> str:
    if r["rc"] != 0:
        tail = r["output"].strip().splitlines()[-3:]
        return f"{name:<44} FAILED rc={r['rc']}: {' | '.join(tail)}"
    loop = f"{tokens / r['loop']:9.0f}" if r.get("loop") else "      n/a"
    text = (f"{name:<44} wall {r['wall']:7.1f}s  e2e {tokens / r['wall']:8.0f} tok/s  "
            f"loop {loop} tok/s  peak RSS {r['peak_mib']:7.0f} MiB")
    st = r.get("startup")
    if st:  # summary.json's breakdown: process start -> first gradients
        text += (f"\n{'':<44} first gradients {st['first_gradient_s']:.1f}s after start: to stage "
                 f"{st['process_to_stage_s']:.1f}s, Ray {st['ray_start_s']:.1f}s, worker set-up "
                 f"{st['worker_setup_s']:.1f}s; first window back {st['workers_to_first_batch_s']:.1f}s "
                 f"after Ray; driver received {r['driver_bytes']} B/row")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--command", choices=("build", "reduce"), default="build")
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--workers", default="1,ray1,2")
    ap.add_argument("--projection_dim", type=int, default=16,
                    help="0: whole gradients (both CLIs' default; rows of 786k floats, disk-bound)")
    ap.add_argument("--model", default="tiny",
                    help="tiny, pythia-14m / pythia-160m (random weights, written locally) or a model dir")
    ap.add_argument("--token_batch_size", type=int, default=512)
    args = ap.parse_args()
    flags = command_args(args.command, args.projection_dim, args.token_batch_size)
    variants = args.workers.split(",")
    try:
        kinds = {parse_variant(v)[0] for v in variants}
    except ValueError as err:
        ap.error(str(err))
    root = Path(os.environ.get("BENCH_DIR", tempfile.gettempdir())) / "bergson_ray_bench"
    root.mkdir(parents=True, exist_ok=True)
    model, data = prepare(args.docs, args.tokens, root, args.model)
    total_tokens = args.docs * args.tokens
    print(f"{args.command} p={args.projection_dim}, {args.model} model, token batch {args.token_batch_size}: {args.docs} docs x {args.tokens} tokens = {total_tokens} tokens; "
          f"{os.cpu_count()} CPUs; machine busy {cpu_busy_percent():.0f}% before start")
    head = None
    results: dict[str, list[dict]] = {}
    try:
        if "head" in kinds:
            head = LocalHead(num_cpus=os.cpu_count(), env=loopback_env(**ENV))
            warm = ours(args.command, flags, model, data, root / "ours_warmup", "head1", head)
            time.sleep(10)  # the job's worker and Ray's idle ones exit after it
            idle = sum(tree_rss_mib(pid) for pid in head_roots(head))
            print(f"head at {head.address}: first command {warm['wall']:.1f}s (not counted); "
                  f"idle head {idle:.0f} MiB RSS")
        for _ in range(args.reps):
            if bergson_cli():
                results.setdefault("bergson", []).append(
                    theirs(args.command, flags, model, data, root / "bergson_out"))
            for v in variants:
                name = f"bergson_ray {variant_name(v)}"
                results.setdefault(name, []).append(
                    ours(args.command, flags, model, data, root / f"ours_{v}", v, head))
    finally:
        if head is not None:
            head.stop()
    best = {k: min((r for r in v if r["rc"] == 0), key=lambda r: r["wall"], default=v[0])
            for k, v in results.items()}
    for name, r in best.items():
        print(line(name, r, total_tokens))
    if "bergson" in best and best["bergson"]["rc"] == 0:
        b = best["bergson"]
        for name, r in best.items():
            if name == "bergson" or r["rc"] != 0:
                continue
            e2e = b["wall"] / r["wall"]
            loop = (b["loop"] / r["loop"]) if (b.get("loop") and r.get("loop")) else float("nan")
            print(f"ratio {name} / bergson: end-to-end {e2e:.2f}x, gradient loop {loop:.2f}x")
    else:
        print("bergson not installed (bash scripts/bergson_anchor.sh): no ratio")
    shutil.rmtree(root / "bergson_out", ignore_errors=True)


if __name__ == "__main__":
    main()
