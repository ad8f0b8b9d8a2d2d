#!/usr/bin/env bash
# Run HERE (with network to the package registry) before benchmarks/gpu_suite.sh runs on a
# lent GPU machine, which reaches nothing outside itself. Fills .gpu/ (git-ignored; name it
# in the device tool's `carry`): wheels of the small packages that machine lacks, and the
# tiny assets (tokenizer, corpus) the suite's workload is built from. Ray (~70 MB) and
# faiss-gpu (~200 MB) exceed what a call may carry (64 MiB): the suite measures the worker
# loop in process and reports the FAISS figure only where faiss-gpu is present.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/whl .gpu/cache
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any)
for pkg in bergson==2.5.1 datasets dill multiprocess natsort petname simple-parsing docstring-parser \
           torchopt optree; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLAT[@]}" -d .gpu/whl "$pkg"
done
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python - <<'PY'
import shutil
from bergson_ray.defaults.tiny import ensure_tiny_assets, make_long_corpus
make_long_corpus(2000, 512)  # built in (or taken from) this machine's cache, then copied
root = ensure_tiny_assets().root
for src in (root, root.parent / f"{root.name}-long-2000x512"):
    shutil.copytree(src, f".gpu/cache/{src.name}")
PY
rm -f .gpu/cache/*/corpus/cache-*.arrow .gpu/cache/*/query/cache-*.arrow
du -sh .gpu
