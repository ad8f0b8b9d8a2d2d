"""The Python API end to end: build -> reduce -> score, then read the results back.

What it shows, on the embedded tiny default (model "tiny", dataset "tiny"; nothing is
downloaded, the first run builds the tiny assets once into ~/.cache/bergson_ray):

1. ``bergson_ray.build``  a p=16 projected gradient store of ``train[:200]``;
2. ``bergson_ray.reduce`` one mean query gradient of 4 rows of the tiny query set;
3. ``bergson_ray.score``  ``train[:200]`` against that query (cosine: ``unit_normalize``),
   with ``top_k=5`` so the run also writes ``top_k.parquet`` (best rows and their text);
4. the readers: ``GradientStore`` (rows, per-module views, ``data.hf`` as pandas) and
   ``ScoreStore`` (``to_pandas``).

Every call starts (or reuses) a local, loopback-only Ray in this process. Keyword
arguments are the CLI flag names (``bergson-ray build --help`` lists them all).

Run it from the repository root (about a minute on a 2-core CPU):

    .venv/bin/python examples/python_api.py                 # results in a temp dir
    .venv/bin/python examples/python_api.py --out runs/api  # keep the run directories
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bergson_ray.utils.ray_env import set_loopback_env

# A local Ray: loopback only, no token auth, no usage stats. Set before Ray is imported.
set_loopback_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import datasets  # noqa: E402
import pandas as pd  # noqa: E402

import bergson_ray  # noqa: E402
from bergson_ray.defaults.tiny import ensure_tiny_assets  # noqa: E402

# Settings that must agree between the corpus store, the query and the scores.
COMMON = dict(
    model="tiny",
    projection_dim=16,  # each module's gradient is projected to 16 x 16
    truncation=True,  # cut documents longer than the token budget instead of failing
    num_workers=1,  # gradient worker actors (0 = one per GPU, or 1 on a CPU-only cluster)
    overwrite=True,  # replace a finished run directory of the same name
)


def run(out: Path) -> None:
    assets = ensure_tiny_assets()  # builds the tiny model + corpus once, then cached

    t0 = time.perf_counter()
    store_path = bergson_ray.build(
        run_path=out / "index", dataset="tiny", split="train[:200]", **COMMON
    )
    print(f"\nbuild  -> {store_path}  ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    query_path = bergson_ray.reduce(
        run_path=out / "query",
        dataset=str(assets.query_dir),  # a save_to_disk dir; any dataset works
        split="train[:4]",
        aggregation="mean",  # one row: the mean of the 4 query gradients
        unit_normalize=True,  # normalize each query gradient before averaging
        **COMMON,
    )
    print(f"reduce -> {query_path}  ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    scores_path = bergson_ray.score(
        run_path=out / "scores",
        dataset="tiny",
        split="train[:200]",
        query_path=str(query_path),
        unit_normalize=True,  # cosine similarity between each document and the query
        top_k=5,  # also write top_k.parquet with the 5 best rows and their text
        **COMMON,
    )
    print(f"score  -> {scores_path}  ({time.perf_counter() - t0:.1f}s)")

    # --- the answer: the training documents most aligned with the query ----------------
    qrows = datasets.load_from_disk(str(assets.query_dir))[:4]
    print("\nThe 4 query documents (src_idx: their row in the corpus):")
    for text, src in zip(qrows["text"], qrows["src_idx"]):
        print(f"  - [{src:3d}] " + " ".join(text.split())[:90])
    top = pd.read_parquet(scores_path / "top_k.parquet")  # query, rank, direction, row, score, text
    top = top[top.direction == "top"]
    print("\nTop 5 training rows for the mean query (cosine):")
    for r in top.itertuples():
        snippet = " ".join(r.text.split())[:90]
        mark = "*" if r.row in qrows["src_idx"] else " "
        print(f"  {r.rank}. row {r.row:3d}{mark} cos {r.score:+.3f}  {snippet}")
    print("  (* = one of the query documents itself, found in the corpus)")

    # --- reading a gradient store ---------------------------------------------------------
    store = bergson_ray.GradientStore.open(store_path)
    print(f"\n{store}")
    print(f"  {len(store.grad_sizes)} modules, e.g. {list(store.grad_sizes.items())[:2]}")
    rows = store.rows([0, 1, 2])  # float32 tensor [3, total_dim], a copy
    print(f"  rows([0, 1, 2]) -> {tuple(rows.shape)} {rows.dtype}")
    first = next(iter(store.grad_sizes))
    print(f"  module({first!r}) -> memmap view {store.module(first).shape}")
    docs = store.data.to_pandas()  # data.hf: the source rows plus length and loss
    print("  data.hf:")
    print(docs[["length", "loss", "text"]].head(3).to_string(max_colwidth=60))

    # --- reading a score store ------------------------------------------------------------
    scores = bergson_ray.ScoreStore.open(scores_path)
    print(f"\n{scores}")
    table = scores.to_pandas()  # score_0 (one column per query), row
    print(table.sort_values("score_0", ascending=False).head(5).to_string(index=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where to keep the runs (default: a temp dir)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.out:
        run(args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="bergson_ray_example_") as tmp:
            run(Path(tmp))
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
