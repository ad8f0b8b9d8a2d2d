"""Query latency and throughput: FAISS search in-process and through the service.

For each store size (random clustered 256-d rows; default 100k and 1M) and index
(``Flat`` and ``IVF<nlist>,Flat``):

* in-process (``GradientIndex``): build/load time, p50/p99 of single top-10 searches,
  throughput of batched searches (q/s), recall@10 of IVF against Flat;
* through the service (``serve`` on a private local Ray, ``connect().query_gradients``):
  the same single/batched figures, including Ray's round trip;
* bergson's exact ``Attributor`` on the same store when its anchor venv exists.

Query-gradient time (model forward/backward) is measured separately on the tiny store:
in-process ``Attributor.gradients`` and the service's text path (``client.query`` minus
search), single texts and 32 concurrent ones (micro-batched by the query actor).

Target (issue): p50 search <= 5 ms for top-10 over 1M rows with IVF on CPU.

    python benchmarks/query_latency.py [--rows 100000,1000000] [--nprobe 16]
        [--no-service] [--no-bergson] [--workdir DIR] [--out results.json]

Benchmarks print; they assert nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _harness import ANCHOR_VENV, cpu_busy_percent  # noqa: E402

from bergson_ray.utils.ray_env import LOOPBACK_ENV  # noqa: E402

ENV = {
    **LOOPBACK_ENV,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
}
os.environ.update(ENV)

K = 10
NAMESPACE = "bergson_ray_bench"


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def time_single(fn, queries: np.ndarray, n: int) -> dict:
    fn(queries[:1])  # warm-up
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(queries[i % len(queries) : i % len(queries) + 1])
        times.append(time.perf_counter() - t0)
    return percentiles(times)


def time_batched(fn, queries: np.ndarray, batch: int, repeats: int = 3) -> dict:
    q = queries[:batch]
    fn(q)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(q)
    dt = (time.perf_counter() - t0) / repeats
    return {"batch": len(q), "qps": round(len(q) / dt, 1), "ms_per_batch": round(dt * 1e3, 2)}


def auto_nlist(rows: int) -> int:
    """A power of two near 2*sqrt(rows): 512 for 100k, 2048 for 1M."""
    return 2 ** round(math.log2(2 * math.sqrt(rows)))


def make_queries(store, n: int, seed: int = 1) -> np.ndarray:
    """Store rows plus noise: queries that look like the corpus (as real ones do)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(store.num_grads, size=n, replace=False))
    base = store.rows(idx).numpy()
    return (base + 0.3 * rng.standard_normal(base.shape, dtype=np.float32)).astype(np.float32)


def recall(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b)]))


def bench_in_process(
    store_path: Path, factory: str, nprobe: int, queries, args
) -> tuple[dict, np.ndarray]:
    from bergson_ray.config import FaissConfig
    from bergson_ray.query.gradient_index import GradientIndex
    from bergson_ray.query.rows import StoreRows
    from bergson_ray.store.gradient_store import GradientStore

    store = GradientStore.open(store_path)
    t0 = time.perf_counter()
    index = GradientIndex(
        StoreRows(store), FaissConfig(factory, nprobe=nprobe), store_path=store_path
    )
    open_s = time.perf_counter() - t0

    def search(q):
        return index.search_prepared(q, K)

    out = {
        "open_s": round(open_s, 2),
        "single": time_single(search, queries, args.singles),
        "batched": time_batched(search, queries, args.batch),
    }
    ids = index.search_prepared(queries, K).ids
    return out, ids


def bench_service(store_path: Path, factory: str, nprobe: int, queries, args) -> dict:
    from bergson_ray.pipelines.serve import serve, stop
    from bergson_ray.query.client import connect

    name = f"bench-{int(time.time() * 1000) % 10**8}"
    t0 = time.perf_counter()
    serve(
        store=str(store_path),
        name=name,
        namespace=NAMESPACE,
        index_factory=factory,
        nprobe=nprobe,
        num_shards=args.shards,
        load_model=False,
    )
    start_s = time.perf_counter() - t0
    try:
        client = connect(name=name, namespace=NAMESPACE)

        def search(q):
            return client.query_gradients(q, k=K)

        return {
            "start_s": round(start_s, 2),
            "shards": args.shards,
            "single": time_single(search, queries, args.singles),
            "batched": time_batched(search, queries, args.batch),
        }
    finally:
        stop(name, NAMESPACE)


BERGSON_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, torch
    from bergson.query.attributor import Attributor
    store, qpath, n, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    q = torch.from_numpy(np.load(qpath))
    t0 = time.perf_counter()
    attr = Attributor(store, device="cpu")
    open_s = time.perf_counter() - t0
    def search(x):
        return attr.search({"gradients": x}, 10)
    search(q[:1])
    times = []
    for i in range(n):
        t0 = time.perf_counter(); search(q[i % len(q): i % len(q) + 1]); times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    t0 = time.perf_counter(); search(q[:batch]); dt = time.perf_counter() - t0
    print(json.dumps({"open_s": round(open_s, 2),
                      "single": {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))},
                      "batched": {"batch": batch, "qps": round(batch / dt, 1)}}))
    """
)


def bench_bergson(store_path: Path, queries: np.ndarray, args) -> dict | None:
    py = ANCHOR_VENV / "bin" / "python"
    if not py.exists():
        return None
    qpath = Path(args.workdir) / "bergson_queries.npy"
    np.save(qpath, queries)
    r = subprocess.run(
        [
            str(py),
            "-c",
            BERGSON_SCRIPT,
            str(store_path),
            str(qpath),
            str(args.singles),
            str(args.batch),
        ],
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, **ENV},
    )
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_gradients(workdir: Path, args) -> dict:
    """Query-gradient cost on the tiny model: in-process and through the service."""
    from bergson_ray.query.attributor import Attributor
    from bergson_ray.query.testing import tiny_store

    store = tiny_store(workdir / "tiny64", n_docs=64)
    attr = Attributor(store)
    texts = [t for t in attr.docs.texts(np.arange(32)) if t]
    single = [texts[i % len(texts)][:400] for i in range(args.singles // 4 or 1)]
    attr.gradients(single[:1])
    times = []
    for t in single:
        t0 = time.perf_counter()
        attr.gradients([t])
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    attr.gradients([t[:400] for t in texts])
    batch_dt = time.perf_counter() - t0
    out = {
        "in_process": {
            "single": percentiles(times),
            "batched": {"batch": len(texts), "qps": round(len(texts) / batch_dt, 1)},
        }
    }
    if args.service:
        import ray

        from bergson_ray.pipelines.serve import serve, stop
        from bergson_ray.query.client import connect

        serve(store=str(store), name="bench-text", namespace=NAMESPACE)
        try:
            c = connect(name="bench-text", namespace=NAMESPACE)
            c.query(single[:1], k=K)
            g_times, q_times = [], []
            for t in single:
                t0 = time.perf_counter()
                c.gradients([t])
                g_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                c.query([t], k=K)
                q_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ray.get([c.handle.query.remote([t[:400]], K, False) for t in texts])
            conc_dt = time.perf_counter() - t0
            out["service"] = {
                "gradients_single": percentiles(g_times),
                "query_single_total": percentiles(q_times),
                "concurrent_text_queries": {"n": len(texts), "qps": round(len(texts) / conc_dt, 1)},
                "model_batches": c.info()["model_batches"],
            }
        finally:
            stop("bench-text", NAMESPACE)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--singles", type=int, default=200, help="single queries timed")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--shards", type=int, default=1, help="index shards in the service")
    ap.add_argument("--no-service", dest="service", action="store_false")
    ap.add_argument("--no-bergson", dest="bergson", action="store_false")
    ap.add_argument("--no-gradients", dest="gradients", action="store_false")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bergson_ray_qbench_")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    from bergson_ray.query.faiss_index import configure_faiss
    from bergson_ray.query.testing import random_store
    from bergson_ray.store.gradient_store import GradientStore

    configure_faiss(1)
    if args.service:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False,
                 object_store_memory=1 << 30)  # fmt: skip
    report: dict = {
        "machine": f"{os.cpu_count()} CPUs, no GPU; cpu busy before start {cpu_busy_percent():.0f}%",
        "k": K,
        "nprobe": args.nprobe,
        "stores": {},
    }
    for n in [int(x) for x in args.rows.split(",") if x]:
        t0 = time.perf_counter()
        path = random_store(workdir / f"random_{n}x{args.dim}", num_rows=n, dim=args.dim)
        store = GradientStore.open(path)
        queries = make_queries(store, max(args.batch, 256))
        entry: dict = {"write_s": round(time.perf_counter() - t0, 1), "indexes": {}}
        flat_ids = None
        for factory in ["Flat", f"IVF{auto_nlist(n)},Flat"]:
            res, ids = bench_in_process(path, factory, args.nprobe, queries, args)
            if factory == "Flat":
                flat_ids = ids
            else:
                res["recall@10_vs_flat"] = round(recall(ids, flat_ids), 4)
            row = {"in_process": res}
            if args.service:
                row["service"] = bench_service(path, factory, args.nprobe, queries, args)
            entry["indexes"][factory] = row
            print(json.dumps({f"{n} rows {factory}": row}), flush=True)
        if args.bergson:
            entry["bergson_exact_attributor"] = bench_bergson(path, queries, args)
            print(json.dumps({f"{n} rows bergson": entry["bergson_exact_attributor"]}), flush=True)
        report["stores"][str(n)] = entry
    if args.gradients:
        report["query_gradients_tiny"] = bench_gradients(workdir, args)
        print(json.dumps({"query gradients": report["query_gradients_tiny"]}), flush=True)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
