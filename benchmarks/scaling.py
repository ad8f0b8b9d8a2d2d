"""Scaling of ``build`` with the number of gradient workers: tokens/s and efficiency.

Builds the same store (p=16, the tiny model, a corpus of ``--docs`` x ``--tokens``
tokens) with 1, 2 and 4 workers on one Ray cluster, each worker pinned to
``--threads`` torch threads so that adding workers is the only change. For each
width it prints

* end-to-end tokens/s (call to return, including actor start-up and model loading),
* steady tokens/s (from the first finished batch to the last), from the run's
  ``summary.json``; it also counts a worker still starting beside one already at work
  and the tail where one has finished,
* all-busy tokens/s (``all_busy_tokens_per_second``: from the last worker's first batch
  to the first worker's last, when every worker runs): the gradient loop with every
  worker up, the like-for-like figure across widths,
* speed-up over the first width and scaling efficiency = all-busy tokens/s / (workers x
  all-busy tokens/s of 1 worker).

By default a local Ray is started with ``--cpus`` logical CPUs (the default, 2 per
worker for the widest run, oversubscribes a small machine on purpose: workers reserve
0.5 CPU each and Ray Data's own tasks need a free slot). ``--address`` measures an
existing cluster instead. On a machine with C physical cores expect efficiency near 1
up to about C single-threaded workers and a plateau after.

With ``--reps N`` each width runs N times, interleaved, and the median run (by all-busy
tokens/s) is shown.

    python benchmarks/scaling.py [--workers 1,2,4] [--docs 512] [--tokens 128] [--reps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bergson_ray.utils.ray_env import set_loopback_env

set_loopback_env(  # before Ray is imported
    RAY_DATA_DISABLE_PROGRESS_BARS="1",
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)

sys.path.insert(0, str(Path(__file__).parent))
from _harness import cpu_busy_percent  # noqa: E402


def prepare(docs: int, tokens: int, root: Path) -> str:
    from bergson_ray.defaults.tiny import ensure_tiny_assets, make_long_corpus

    ensure_tiny_assets()
    data = root / f"long_{docs}x{tokens}"
    if not data.exists():
        make_long_corpus(docs, tokens).save_to_disk(str(data))
    return str(data)


def one_build(data: str, out: Path, workers: int, threads: int, window: int) -> dict:
    from bergson_ray.pipelines.build import build

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    path = build(
        run_path=out,
        dataset=data,
        projection_dim=16,
        truncation=True,
        num_workers=workers,
        torch_threads=threads,
        window_size=window,
        overwrite=True,
    )
    wall = time.perf_counter() - t0
    s = json.loads((Path(path) / "summary.json").read_text())
    return {
        "workers": workers,
        "wall": wall,
        "tokens": s["tokens"],
        "e2e_tps": s["tokens"] / wall,
        "steady_tps": s.get("steady_tokens_per_second") or s["stage_tokens_per_second"],
        "busy_tps": s.get("all_busy_tokens_per_second") or float("nan"),
        "seen": s.get("workers_seen", 0),
        "startup": s.get("startup_seconds", float("nan")),
        "nodes": len(s.get("rows_per_node", {})),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--docs", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--window", type=int, default=16, help="documents per Ray Data batch")
    ap.add_argument("--reps", type=int, default=1, help="runs per width (the median is shown)")
    ap.add_argument("--cpus", type=float, default=0, help="logical CPUs of the local Ray")
    ap.add_argument("--address", default=None, help="existing cluster (default: local Ray)")
    args = ap.parse_args()
    widths = [int(x) for x in args.workers.split(",")]

    import ray

    root = Path(os.environ.get("BENCH_DIR", tempfile.gettempdir())) / "bergson_ray_scaling"
    root.mkdir(parents=True, exist_ok=True)
    data = prepare(args.docs, args.tokens, root)
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=args.cpus or 2 * max(widths),
            include_dashboard=False,
            object_store_memory=512 * 2**20,
            log_to_driver=False,
        )
    print(
        f"build p=16 of {args.docs} docs x {args.tokens} tokens; {os.cpu_count()} CPUs, "
        f"Ray CPUs {ray.cluster_resources().get('CPU')}; {args.threads} torch thread(s) per "
        f"worker; machine busy {cpu_busy_percent():.0f}% before start"
    )
    runs: dict[int, list[dict]] = {w: [] for w in widths}
    for _ in range(args.reps):
        for w in widths:
            runs[w].append(one_build(data, root / f"w{w}", w, args.threads, args.window))
    med = {w: sorted(rs, key=lambda r: r["busy_tps"])[len(rs) // 2] for w, rs in runs.items()}
    one = med[widths[0]]
    print(f"{'workers':>7} {'seen':>4} {'wall s':>7} {'start s':>7} {'e2e tok/s':>10} "
          f"{'steady tok/s':>12} {'all-busy tok/s':>14} {'speed-up':>17} {'efficiency':>10}")  # fmt: skip
    for w in widths:
        r = med[w]
        speed = r["busy_tps"] / one["busy_tps"]
        eff = r["busy_tps"] / (w / widths[0] * one["busy_tps"])
        steady = r["steady_tps"] / one["steady_tps"]
        print(
            f"{w:>7} {r['seen']:>4} {r['wall']:>7.1f} {r['startup']:>7.1f} {r['e2e_tps']:>10.0f} "
            f"{r['steady_tps']:>12.0f} {r['busy_tps']:>14.0f} {speed:>6.2f} (steady {steady:.2f}) "
            f"{eff:>10.2f}"
        )
    if args.reps > 1:
        for w in widths:
            each = ", ".join(f"{r['busy_tps'] / one['busy_tps']:.2f}" for r in runs[w])
            print(f"  {w} worker(s), all-busy speed-up of each run over the median 1st width: {each}")
    ray.shutdown()


if __name__ == "__main__":
    main()
