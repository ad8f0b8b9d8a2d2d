"""The worker's inner loop alone, no Ray: what one ``build`` worker does per window.

Like nanoGPT's ``bench.py``: the same ``GradientRunner`` a Ray worker builds, on the
same workload as ``build_throughput.py`` (1000 x 256-token documents, p=16, token batch
512), fed windows of row indices in this process. Ray's share of a run is the
difference between this figure and ``build_throughput.py``'s (its "loop" is the
workers' busy time; its end to end adds Ray, actor start and model load). Also prints
where one window's time goes (read + tokenize, forward + backward + projection).

    python benchmarks/runner_loop.py [--docs 1000] [--tokens 256] [--window 64] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import cpu_busy_percent  # noqa: E402
from build_throughput import prepare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--window", type=int, default=64, help="rows per worker call (--window_size)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--projection_dim", type=int, default=16)
    ap.add_argument("--model", default="tiny",
                    help="tiny, pythia-14m / pythia-160m (random weights, written locally) or a model dir")
    ap.add_argument("--data", default="", help="save_to_disk dir (default: the long corpus)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16, ...")
    ap.add_argument("--token_batch_size", type=int, default=512)
    args = ap.parse_args()

    import torch

    from bergson_ray.config import BatchConfig, DataConfig, GradientConfig, ModelConfig
    from bergson_ray.runners.gradient_runner import OneProcess, RunnerSpec

    root = Path(os.environ.get("BENCH_DIR", tempfile.gettempdir())) / "bergson_ray_bench"
    root.mkdir(parents=True, exist_ok=True)
    model, data = prepare(args.docs, args.tokens, root, args.model)
    spec = RunnerSpec(
        model=ModelConfig(model=model, precision=args.precision),
        grad=GradientConfig(projection_dim=args.projection_dim),
        data=DataConfig(dataset=args.data or data, truncation=True),
        batch=BatchConfig(token_batch_size=args.token_batch_size),
        device=args.device,
    )
    print(f"runner loop p={args.projection_dim}: {args.docs} docs x {args.tokens} tokens, window "
          f"{args.window}; {os.cpu_count()} CPUs; machine busy {cpu_busy_percent():.0f}% before start")
    t0 = time.perf_counter()
    runner = OneProcess(args.threads or os.cpu_count() or 1).build(spec)
    print(f"set-up (model load, dataset open): {time.perf_counter() - t0:.2f}s; "
          f"torch threads {torch.get_num_threads()}")

    windows = np.array_split(np.arange(args.docs), max(1, args.docs // args.window))
    runner.gradients(windows[0][:2])  # warm-up: first-call allocations, lazy imports
    read_s = grad_s = 0.0
    tokens = 0
    for idx in windows:
        t = time.perf_counter()
        runner.tokenize(idx)  # alone, to split the window's time
        t1 = time.perf_counter()
        out = runner.gradients(idx)  # the worker's real call (reads and tokenizes again)
        read_s += t1 - t
        grad_s += time.perf_counter() - t1
        tokens += int(out["length"].sum())
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"loop: {tokens} tokens in {grad_s:.2f}s = {tokens / grad_s:.0f} tok/s "
          f"(read + tokenize {read_s:.2f}s, forward/backward/projection {grad_s - read_s:.2f}s)")

if __name__ == "__main__":
    main()
