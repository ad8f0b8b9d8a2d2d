"""What MAGIC costs: forward training vs one per-query reverse pass, columns per minute
with 1 and 2 Ray workers, peak RSS per worker, and bergson's ``magic`` side by side.

    .venv/bin/python benchmarks/magic_cost.py [--docs 32] [--queries 4] [--batch_size 8]

Uses bergson's tiny anchor assets (``../shared/tools/anchor``) when they exist, so both
programs see the same model and data; otherwise our embedded tiny default. Prints
figures and ratios, asserts nothing (target: reverse / forward <= 5x). On the shared
2-core machine timings swing 2-3x: compare ratios taken in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import bergson_cli, run_timed  # noqa: E402

ANCHOR = Path("~/.cache/bergson-anchor").expanduser()


def assets() -> dict[str, str]:
    """Model and data paths: bergson's anchor assets if built, else ``tiny``."""
    model, data = ANCHOR / "models" / "tiny-neox", ANCHOR / "data"
    if model.is_dir() and (data / "pydoc").exists():
        return {"model": str(model), "dataset": str(data / "pydoc"),
                "query": str(data / "pydoc_query")}
    return {"model": "tiny", "dataset": "tiny", "query": "tiny"}


def recipe(a: dict[str, str], args) -> dict:
    return dict(
        model=a["model"], dataset=a["dataset"], split=f"train[:{args.docs}]", truncation=True,
        batch_size=args.batch_size, lr=1e-3, torch_threads=1, save_mode="sqrt",
        **{"query.dataset": a["query"], "query.split": f"train[:{args.queries}]",
           "query.truncation": True},
    )


def in_process(kw: dict) -> dict:
    """Forward and one reverse pass in this process, one torch thread."""
    import torch

    from bergson_ray.config.coerce import as_config
    from bergson_ray.config.magic import MagicRunConfig
    from bergson_ray.magic import StateStore, forward, initial_weights, query_gradient, reverse
    from bergson_ray.magic.engine import MagicSpec

    torch.set_num_threads(1)
    cfg = as_config(MagicRunConfig, run_path="unused", **kw)
    with tempfile.TemporaryDirectory() as tmp:
        spec = MagicSpec(cfg.model, cfg.data, cfg.query_data(), cfg.training,
                         checkpoints=f"{tmp}/c", columns=f"{tmp}/q", torch_threads=1)
        eng = spec.build()
        w = initial_weights(eng.recipe, False)
        t0 = time.perf_counter()
        final = forward(eng.recipe, w, StateStore())
        t_fwd = time.perf_counter() - t0
        store = StateStore()
        forward(eng.recipe, w, store)
        cot, _ = query_gradient(eng.model, final.params, eng.query, "none", 0)
        t0 = time.perf_counter()
        reverse(eng.recipe, store, cot, w)
        t_rev = time.perf_counter() - t0
    return {"forward_s": t_fwd, "reverse_s": t_rev, "ratio": t_rev / t_fwd}


def on_ray(kw: dict, workers: int, root: Path) -> dict:
    from bergson_ray.pipelines.magic import magic

    out = magic(run_path=str(root / f"w{workers}"), overwrite=True, num_workers=workers, **kw)
    s = json.loads((out / "summary.json").read_text())
    per_min = 60 * s["columns_computed"] / max(s["reverse_seconds"], 1e-9)
    return {"columns_per_min": per_min, "rss_mib": s["worker_peak_rss_mib"], "wall_s": s["seconds"]}


def bergson(a: dict[str, str], args, root: Path) -> dict | None:
    exe = bergson_cli()
    if exe is None or a["model"] == "tiny":
        return None
    cmd = [str(exe), "magic", str(root / "bergson"), "--overwrite", "true",
           "--model", a["model"], "--data.dataset", a["dataset"],
           "--data.split", f"train[:{args.docs}]", "--data.truncation", "true",
           "--query.dataset", a["query"], "--query.split", f"train[:{args.queries}]",
           "--query.truncation", "true", "--batch_size", str(args.batch_size),
           "--lr", "1e-3", "--save_mode", "sqrt", "--wandb_project", "", "--skip_validation", "true"]
    res = run_timed(cmd, env={"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"})
    if res["rc"] != 0:
        print("bergson magic failed:\n" + res["output"][-2000:])
        return None
    return {"wall_s": res["wall"], "peak_mib": res["peak_mib"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=8)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bergson_ray.utils.ray_env import init_ray, set_loopback_env

    set_loopback_env()
    a = assets()
    kw = recipe(a, args)
    print(f"recipe: {args.docs} docs, {args.queries} queries, batch {args.batch_size}, model {a['model']}")
    r = in_process(kw)
    print(f"forward training {r['forward_s']:.2f} s, one per-query reverse {r['reverse_s']:.2f} s, "
          f"ratio {r['ratio']:.2f}x (target <= 5x)")
    init_ray(os.environ.get("RAY_ADDRESS") or "local")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t_ours = time.perf_counter()
        for n in (1, 2):
            s = on_ray(kw, n, root)
            print(f"{n} worker(s): {s['columns_per_min']:.1f} columns/min, "
                  f"peak RSS per worker {s['rss_mib']} MiB, run {s['wall_s']:.1f} s")
        t_ours = time.perf_counter() - t_ours
        b = bergson(a, args, root)
        if b is not None:
            print(f"bergson magic (same recipe, 1 process): {b['wall_s']:.1f} s wall, "
                  f"peak {b['peak_mib']:.0f} MiB")
        else:
            print("bergson magic: anchor venv or assets missing, skipped")


if __name__ == "__main__":
    main()
