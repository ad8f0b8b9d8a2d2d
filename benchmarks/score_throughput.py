"""Documents/s and peak memory of ``score`` for growing corpora and query counts.

Scores N documents (the tiny pydoc corpus tiled to N rows) against 1 and 32 query
gradients (p=16). Peak RSS of the whole process tree must stay flat as N grows:
gradients are scored in the workers and never kept. When the anchor venv exists,
bergson's own ``score`` runs on the same data (its query store built by bergson).

    python benchmarks/score_throughput.py [--docs 1000,10000] [--queries 1,32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import bergson_cli, cpu_busy_percent, run_timed, tqdm_seconds  # noqa: E402
from build_throughput import ENV  # noqa: E402


def tiled_corpus(n: int, root: Path) -> str:
    import datasets

    from bergson_ray.defaults.tiny import ensure_tiny_assets

    out = root / f"tiled_{n}"
    if not out.exists():
        base = datasets.load_from_disk(str(ensure_tiny_assets().corpus_dir))
        reps = -(-n // len(base))
        datasets.concatenate_datasets([base] * reps).select(range(n)).save_to_disk(str(out))
    return str(out)


def query_store(q: int, root: Path, bergson: bool) -> str:
    from bergson_ray.defaults.tiny import ensure_tiny_assets

    assets = ensure_tiny_assets()
    out = root / f"query_{q}_{'bergson' if bergson else 'ours'}"
    if out.exists():
        return str(out)
    common = ["--model", str(assets.model_dir), "--dataset", str(assets.query_dir), "--split",
              f"train[:{q}]", "--projection_dim", "16", "--truncation", "--token_batch_size", "512"]
    if bergson:
        cmd = [str(bergson_cli()), "build", str(out), *common]
    else:
        cmd = [str(Path(sys.executable).with_name("bergson-ray")), "build", str(out), *common]
    r = run_timed(cmd, ENV)
    if r["rc"]:
        raise SystemExit(f"query build failed:\n{r['output'][-2000:]}")
    return str(out)


def run_score(exe: list[str], data: str, query: str, out: Path, label: str) -> dict:
    """One score run into ``out`` (removed first, so neither tool needs its overwrite flag)."""
    shutil.rmtree(out, ignore_errors=True)
    from bergson_ray.defaults.tiny import ensure_tiny_assets

    model = str(ensure_tiny_assets().model_dir)
    cmd = [*exe, "score", str(out), "--model", model, "--dataset", data, "--query_path", query,
           "--projection_dim", "16", "--truncation", "--token_batch_size", "512"]
    r = run_timed(cmd, ENV)
    r["loop"] = tqdm_seconds(r, label)
    summary = out / "summary.json"
    if r["rc"] == 0 and summary.exists():  # ours: the workers' own busy time (no start-up)
        busy = json.loads(summary.read_text()).get("worker_compute_seconds")
        r["loop"] = busy or r["loop"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", default="1000,10000")
    ap.add_argument("--queries", default="1,32")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    root = Path(os.environ.get("BENCH_DIR", tempfile.gettempdir())) / "bergson_ray_bench"
    root.mkdir(parents=True, exist_ok=True)
    ours_exe = [str(Path(sys.executable).with_name("bergson-ray"))]
    theirs_exe = [str(bergson_cli())] if bergson_cli() else None
    print(f"score p=16, {args.workers} worker(s); machine busy {cpu_busy_percent():.0f}% before start")
    print(f"{'corpus':>7} {'queries':>7} {'who':<12} {'wall s':>7} {'docs/s e2e':>10} "
          f"{'docs/s loop':>11} {'peak MiB':>9}")
    for n in (int(x) for x in args.docs.split(",")):
        data = tiled_corpus(n, root)
        for q in (int(x) for x in args.queries.split(",")):
            rows = []
            if theirs_exe:
                b = run_score([*theirs_exe], data, query_store(q, root, True), root / "s_b", "Computing")
                rows.append(("bergson", b))
            r = run_score([*ours_exe, "--log_level", "WARNING"], data, query_store(q, root, False),
                          root / "s_o", "score")
            rows.append(("bergson_ray", r))
            for who, res in rows:
                if res["rc"]:
                    print(f"{n:>7} {q:>7} {who:<12} FAILED: {res['output'][-300:]!r}")
                    continue
                loop = f"{n / res['loop']:11.1f}" if res.get("loop") else f"{'n/a':>11}"
                print(f"{n:>7} {q:>7} {who:<12} {res['wall']:7.1f} {n / res['wall']:10.1f} {loop} "
                      f"{res['peak_mib']:9.0f}")
            if len(rows) == 2 and all(x[1]["rc"] == 0 for x in rows):
                (_, b), (_, o) = rows
                loop = f", {b['loop'] / o['loop']:.2f} (loop)" if b.get("loop") and o.get("loop") else ""
                print(f"{'':>16}ratio bergson_ray/bergson docs/s: {b['wall'] / o['wall']:.2f} "
                      f"(end to end){loop}")
    for extra in ("s_b", "s_o"):
        shutil.rmtree(root / extra, ignore_errors=True)


if __name__ == "__main__":
    main()
