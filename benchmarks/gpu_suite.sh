#!/usr/bin/env bash
# The GPU figures, as one prepared command for a lent GPU machine (<= 8 min on one H200):
#
#   here:  bash benchmarks/gpu_prepare.sh            # fills .gpu/ (wheels, tiny assets)
#   there: device run, carry [".gpu"], command:  bash benchmarks/gpu_suite.sh
#
# 1. build tokens/s on a Pythia-160M-shaped GPT-NeoX (random weights from a config
#    written here; no hub) at p=16, bf16: bergson_ray's worker loop (the code each Ray
#    worker runs, in process) and bergson's `build` on the same GPU, model and data;
# 2. GPU FAISS query latency at 1M rows (benchmarks/query_latency.py), where faiss-gpu
#    is installed;
# 3. the CUDA-only tests (int8 rows, CUDA projections, auto batch size on a GPU).
# Everything is printed and kept under $OUT (the device tool's output folder).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore BERGSON_RAY_CACHE="$PWD/.gpu/cache"
PY=${PYTHON:-python3}
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl > "$OUT/pip.log" 2>&1 || echo "wheel install failed (see pip.log)"
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# --- the workload: Pythia-160M shape, random weights, 2000 x 512-token documents
MODEL=/tmp/pythia160m-random
$PY benchmarks/_models.py pythia-160m "$MODEL"
DATA=$($PY -c "from bergson_ray.defaults.tiny import make_long_corpus as m; import glob; m(2000, 512); print(glob.glob('$BERGSON_RAY_CACHE/*-long-2000x512/data')[0])")
echo "data $DATA"

echo "== 1a. bergson_ray worker loop (in process), p=16, bf16"
timeout 200 $PY benchmarks/runner_loop.py --model "$MODEL" --data "$DATA" --docs 2000 --tokens 512 \
  --device cuda --precision bf16 --token_batch_size 16384 --window 256 2>&1 | tee "$OUT/ours.txt"
echo "== 1b. bergson build on the same GPU"
rm -rf /tmp/bergson_build
( time timeout 200 $PY -m bergson build /tmp/bergson_build --model "$MODEL" --dataset "$DATA" \
    --projection_dim 16 --precision bf16 --token_batch_size 16384 --truncation ) > "$OUT/bergson.txt" 2>&1
tr '\r' '\n' < "$OUT/bergson.txt" | grep -E "Computing|real" | tail -3
$PY - "$OUT" <<'PY'
import re, sys
from pathlib import Path
out = Path(sys.argv[1])
ours = re.search(r"= (\d+) tok/s", (out / "ours.txt").read_text())
txt = (out / "bergson.txt").read_text().replace("\r", "\n")
m = [x for x in re.findall(r"Computing[^\n]*?(\d+)/(\d+) \[([\d:]+)<", txt)]
if ours and m:
    done, total, t = m[-1]
    secs = sum(int(x) * 60**i for i, x in enumerate(reversed(t.split(":"))))
    theirs = 2000 * 512 / max(secs, 1)
    print(f"build p=16 bf16 on GPU: ours {ours.group(1)} tok/s, bergson ~{theirs:.0f} tok/s "
          f"(its bar's whole-second clock), ratio {int(ours.group(1)) / theirs:.2f}x")
else:
    print("no ratio: a side failed (see ours.txt / bergson.txt)")
PY

echo "== 2. GPU FAISS query latency at 1M rows"
if $PY -c "import faiss, sys; sys.exit(0 if hasattr(faiss, 'StandardGpuResources') else 1)" 2>/dev/null; then
  timeout 150 $PY benchmarks/query_latency.py --rows 1000000 --no-service --no-bergson --no-gradients 2>&1 | tee "$OUT/faiss.txt"
else
  echo "skipped: faiss with GPU support is not installed on this machine" | tee "$OUT/faiss.txt"
fi

echo "== 3. CUDA-only tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_model_options.py tests/test_projection_versions.py \
  -k "cuda or int8 or auto_batch" 2>&1 | tail -15 | tee "$OUT/tests.txt"
