"""The query service: serve a gradient store, query it with ``bergson_ray.connect``, stop it.

What it shows, on the embedded tiny default (nothing is downloaded):

1. a gradient store of ``train[:200]`` (``bergson_ray.build``), or ``--store PATH``
   to serve one you already have (e.g. ``runs/api/index`` from ``python_api.py --out runs/api``);
2. ``bergson_ray.pipelines.serve.serve``: the service's *detached* named Ray actors, two
   FAISS index shards (``<name>::shard-0/1``) and the query actor ``<name>`` that turns
   text into query gradients exactly as the store's rows were made;
3. ``bergson_ray.connect(name=...)``: a client; ``client.query([...], k=5)`` returns, per
   query, the ids, scores and texts of the best rows (cosine here: ``unit_norm=True``);
4. ``stop(name)``: kills the service's actors (detached actors outlive their driver
   otherwise). It runs in a ``finally`` block, so an error never leaves them behind.

This script runs the service on a private, loopback-only Ray that it starts and that
ends with it. On a real cluster the same steps are three commands, and any process on
the cluster can connect in between (see docs/QUERY_SERVICE.md):

    bergson-ray serve STORE --name pydoc            # once; returns when the service is ready
    python -c 'import bergson_ray; print(bergson_ray.connect(address="auto", name="pydoc").query("..."))'
    bergson-ray stop --name pydoc

Run it from the repository root (about a minute on a 2-core CPU):

    .venv/bin/python examples/query_service_client.py
    .venv/bin/python examples/query_service_client.py --store runs/api/index
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bergson_ray.utils.ray_env import set_loopback_env

# A local Ray: loopback only, no token auth, no usage stats. Set before Ray is imported.
set_loopback_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import ray  # noqa: E402

import bergson_ray  # noqa: E402
from bergson_ray.pipelines.serve import serve, stop  # noqa: E402

NAMESPACE = "bergson_ray"  # the default namespace of `bergson-ray serve` and connect()
QUERIES = [
    "The for statement is used to iterate over the elements of a sequence.",
    "An exception is raised when an assertion fails.",
]


def run(store: Path, name: str, k: int) -> None:
    t0 = time.perf_counter()
    info = serve(
        store=str(store),
        name=name,
        namespace=NAMESPACE,
        num_shards=2,  # rows split over two index actors, searched in parallel and merged
        index_factory="Flat",  # exact search; e.g. "IVF256,Flat" for big stores
        unit_norm=True,  # cosine similarity
    )
    shards = ", ".join(f"rows {s['rows'][0]}-{s['rows'][1]}" for s in info["shards"])
    print(f"\nservice {name!r} ready in {time.perf_counter() - t0:.1f}s: {info['rows']} rows of")
    print(f"dim {info['dim']} in {len(info['shards'])} shards ({shards})")
    try:
        # From here on this is what any other driver on the cluster would do.
        client = bergson_ray.connect(name=name, namespace=NAMESPACE)
        t0 = time.perf_counter()
        results = client.query(QUERIES, k=k)  # one QueryResult per query, best first
        print(f"{len(QUERIES)} queries answered in {1000 * (time.perf_counter() - t0):.0f} ms")
        for res in results:
            print(f"\nquery: {res.query}")
            for rank, (row, score, text) in enumerate(zip(res.ids, res.scores, res.texts), 1):
                snippet = " ".join((text or "").split())[:90]
                print(f"  {rank}. row {row:4d}  cos {score:+.3f}  {snippet}")
        worst = client.query(QUERIES[0], k=2, reverse=True)[0]  # bottom-k: least aligned
        cosines = ", ".join(f"{s:+.3f}" for s in worst.scores)
        print(f"\nleast aligned with the first query: rows {worst.ids}, cos {cosines}")
    finally:
        print(f"\nstopped: {stop(name, NAMESPACE)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="serve this store (default: build one)")
    parser.add_argument("--name", default="example", help="service name")
    parser.add_argument("--k", type=int, default=5, help="hits per query")
    args = parser.parse_args()
    t_start = time.perf_counter()
    # A private single-node Ray in this process ("local": never attach to another Ray
    # running on this machine). The service's detached actors end with it at exit.
    ray.init(address="local", namespace=NAMESPACE, include_dashboard=False)
    with tempfile.TemporaryDirectory(prefix="bergson_ray_example_") as tmp:
        store = args.store
        if store is None:
            store = bergson_ray.build(
                run_path=Path(tmp) / "index",
                model="tiny",
                dataset="tiny",
                split="train[:200]",
                projection_dim=16,
                truncation=True,
                num_workers=1,
            )
        run(store, args.name, args.k)
    ray.shutdown()
    print(f"\ndone in {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
    main()
