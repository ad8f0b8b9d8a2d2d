"""Wall time and per-shard memory of KFAC and EK-FAC fits, in process and on Ray.

Runs ``bergson-ray hessian --method kfac [--ev_correction]`` on the tiny default
model and corpus, with one worker and K shards in the command's own process (no Ray,
what a user on one machine gets by default) or on a private local Ray with K
HessianShard actors, and, when the anchor venv exists
(``bash scripts/bergson_anchor.sh``), ``bergson hessian --method
kfac [--ev_correction true]`` on the same model and documents. Runs alternate
so a busy machine affects both programs alike.

Reported per run: end-to-end wall time (process start to exit: imports, Ray and
actor start-up, model loading included), the fit itself (data passes plus
eigendecompositions: ours from ``summary.json``, bergson's from its progress
bars), peak RSS of the whole process tree, and per shard the tensor bytes it
holds and its process's peak RSS. Ratios are bergson_ray / bergson.

Each of our Ray runs starts its own local Ray (``--address local``): a plain
``ray.init()`` would attach to any Ray cluster already running on the machine.
On a shared machine timings swing several-fold; with ``--reps N`` the table
shows the fastest of the N runs of each configuration (the least disturbed).

    python benchmarks/hessian_fit.py [--split 'train[:400]'] [--variants process1,ray1,ray2,ray4] [--reps 1]
                                     [--model tiny] [--token_batch_size 512]

``--variants``: ``processK`` runs in process (``--executor process``) with K shards,
``rayK`` on Ray with K shard actors, ``headK`` the same on a running head that the
benchmark starts once (README's "Keeping Ray up between commands"; one unmeasured
command warms it, and the head's processes count in peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _harness import bar_spans, bergson_cli, cpu_busy_percent, head_roots, run_timed  # noqa: E402
from _models import model_path  # noqa: E402

from bergson_ray.testing.ray_head import LocalHead  # noqa: E402
from bergson_ray.utils.ray_env import LOOPBACK_ENV, loopback_env  # noqa: E402

ENV = {**LOOPBACK_ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
       "PYTHONWARNINGS": "ignore"}  # fmt: skip
TOKEN_BATCH = 512
"""The default token budget: bergson refuses one above the model's max length (512 for the
tiny model; 2048 for ``--model pythia-14m``)."""
VARIANT = re.compile(r"(process|ray|head)(\d+)")


def ours(
    model: str, data: str, split: str, out: Path, variant: str, ev: bool, head: LocalHead | None,
    token_batch: int = TOKEN_BATCH,
) -> dict:
    exe = Path(sys.executable).with_name("bergson-ray")
    kind, shards = VARIANT.fullmatch(variant).groups()
    where = {"process": ["--executor", "process"], "ray": ["--address", "local"]}.get(kind)
    cmd = [str(exe), "hessian", str(out), "--method", "kfac", "--ev_correction", str(ev).lower(),
           "--model", model, "--dataset", data, "--split", split, "--num_shards", shards,
           "--token_batch_size", str(token_batch), *(where or ["--address", head.address]),
           "--overwrite"]  # fmt: skip
    r = run_timed(cmd, ENV, also=head_roots(head) if kind == "head" else ())
    if r["rc"] == 0:
        s = json.loads((out / "summary.json").read_text())
        r["fit"] = s["factors_pass_s"] + s["eigendecomposition_s"] + s.get("correction_pass_s", 0.0)
        r["phases"] = {
            k: s[k]
            for k in ("factors_pass_s", "eigendecomposition_s", "correction_pass_s")
            if k in s
        }
        r["shard_tensor_mib"] = [m["tensor_bytes"] / 2**20 for m in s["shard_memory"]]
        r["shard_rss_mib"] = [m["peak_rss_bytes"] / 2**20 for m in s["shard_memory"]]
        r["positions"] = s["positions"]
    return r


def theirs(model: str, data: str, split: str, out: Path, ev: bool, token_batch: int = TOKEN_BATCH) -> dict:
    cmd = [str(bergson_cli()), "hessian", str(out), "--method", "kfac", "--ev_correction", str(ev).lower(),
           "--model", model, "--dataset", data, "--split", split,
           "--token_batch_size", str(token_batch), "--overwrite", "true"]  # fmt: skip
    r = run_timed(cmd, ENV)
    bars = bar_spans(r, ("Approximating Hessians", "Computing eigenvectors"))
    r["fit"] = sum(bars.values()) if bars else None
    m = re.findall(r"Total processed: (\d+)", r["output"])
    r["positions"] = int(m[-1]) if m else None
    return r


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--split", default="train[:400]", help="documents of the tiny corpus to fit on")
    ap.add_argument("--variants", default="process1,ray1,ray2,ray4",
                    help="processK: in process with K shards; rayK: K shard actors on Ray")  # fmt: skip
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--no-bergson", action="store_true")
    ap.add_argument("--json", help="also write all results here")
    ap.add_argument("--model", default="tiny",
                    help="tiny, pythia-14m / pythia-160m (random weights, written locally) or a model dir")
    ap.add_argument("--token_batch_size", type=int, default=TOKEN_BATCH)
    args = ap.parse_args()

    from bergson_ray.defaults.tiny import ensure_tiny_assets

    assets = ensure_tiny_assets()
    bench_root = Path(os.environ.get("BENCH_DIR", tempfile.gettempdir())) / "bergson_ray_bench"
    bench_root.mkdir(parents=True, exist_ok=True)
    model, data = model_path(args.model, bench_root), str(assets.corpus_dir)
    tb = args.token_batch_size
    variants = args.variants.split(",")
    if bad := [v for v in variants if not VARIANT.fullmatch(v)]:
        ap.error(f"--variants: {', '.join(bad)} not processK, rayK or headK")
    have_bergson = bergson_cli() is not None and not args.no_bergson
    tmp = Path(tempfile.mkdtemp(prefix="hessian_bench_"))
    print(
        f"model {model}, token batch {tb}\ncorpus {data} split {args.split}; machine busy "
        f"{cpu_busy_percent():.0f}% before start; bergson {'found' if have_bergson else 'absent'}"
    )
    results: list[dict] = []
    head = None
    try:
        if any(v.startswith("head") for v in variants):
            head = LocalHead(num_cpus=os.cpu_count(), env=loopback_env(**ENV))
            warm = ours(model, data, args.split, tmp / "warm", "head1", False, head, tb)
            print(f"head at {head.address}: first command {warm['wall']:.1f}s (not counted)")
        for rep in range(args.reps):
            for ev in (False, True):
                label = "EK-FAC" if ev else "KFAC"
                if have_bergson:
                    r = theirs(model, data, args.split, tmp / f"b_{ev}", ev, tb)
                    results.append(
                        {"prog": "bergson", "method": label, "shards": 1, "rep": rep, **r}
                    )
                    if r["rc"] != 0:
                        print(r["output"][-3000:])
                    print(
                        f"bergson {label}: rc={r['rc']} wall {r['wall']:.1f}s fit {fmt(r['fit'])}s "
                        f"peak tree {r['peak_mib']:.0f} MiB",
                        flush=True,
                    )
                for k in variants:
                    r = ours(model, data, args.split, tmp / f"o_{ev}_{k}", k, ev, head, tb)
                    results.append(
                        {"prog": "bergson_ray", "method": label, "shards": k, "rep": rep, **r}
                    )
                    if r["rc"] != 0:
                        print(r["output"][-3000:])
                        continue
                    print(
                        f"bergson_ray {label} {k}: wall {r['wall']:.1f}s fit {r['fit']:.1f}s "
                        f"{r['phases']} peak tree {r['peak_mib']:.0f} MiB; per shard tensors "
                        f"{[round(x, 1) for x in r['shard_tensor_mib']]} MiB, "
                        f"RSS {[round(x) for x in r['shard_rss_mib']]} MiB",
                        flush=True,
                    )
    finally:
        if head is not None:
            head.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print("\n(best of", args.reps, "run(s) per configuration)")
    print(
        "| program | method | where, K | wall s | fit s | peak tree MiB | max shard tensors MiB |"
        " max shard RSS MiB | wall ratio | fit ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    best: dict[tuple, dict] = {}
    for r in results:
        if r["rc"] != 0:
            continue
        key = (r["prog"], r["method"], r["shards"])
        cur = best.setdefault(key, dict(r))
        cur["wall"] = min(cur["wall"], r["wall"])
        fits = [x for x in (cur.get("fit"), r.get("fit")) if x is not None]
        cur["fit"] = min(fits) if fits else None
        cur["peak_mib"] = max(cur["peak_mib"], r["peak_mib"])
    for key, r in best.items():
        b = best.get(("bergson", key[1], 1))
        ratio = key[0] != "bergson" and b is not None
        wall_ratio = r["wall"] / b["wall"] if ratio else None
        fit_ratio = r["fit"] / b["fit"] if ratio and b.get("fit") and r.get("fit") else None
        tensors = max(r["shard_tensor_mib"]) if "shard_tensor_mib" in r else None
        rss = max(r["shard_rss_mib"]) if "shard_rss_mib" in r else None
        print(
            f"| {key[0]} | {key[1]} | {key[2]} | {r['wall']:.1f} | {fmt(r.get('fit'))} | "
            f"{r['peak_mib']:.0f} | {fmt(tensors)} | {fmt(rss, '.0f')} | "
            f"{fmt(wall_ratio, '.2f')} | {fmt(fit_ratio, '.2f')} |"
        )
    failed = [r for r in results if r["rc"] != 0]
    if failed:
        print(
            f"{len(failed)} run(s) failed: {[(r['prog'], r['method'], r['shards']) for r in failed]}"
        )
    positions = {r["prog"]: r.get("positions") for r in results if r["rc"] == 0}
    print(f"\npositions fitted: {positions} (equal counts = same documents)")
    if args.json:
        Path(args.json).write_text(
            json.dumps([{k: v for k, v in r.items() if k != "output"} for r in results], indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
