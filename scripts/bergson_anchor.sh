#!/usr/bin/env bash
# bergson 2.5.1 in its own venv, plus the tiny assets the interop tests run it on, so that
# tests/test_bergson_interop.py and the other interop tests run instead of skipping.
#
#   bash scripts/bergson_anchor.sh        # CI runs this; idempotent, a second run is instant
#
# Layout (what the tests read; BERGSON_ANCHOR_ROOT moves it):
#   ~/.cache/bergson-anchor/anchor-venv/            bergson==2.5.1 + faiss-cpu on the CPU torch pin
#   ~/.cache/bergson-anchor/models/tiny-neox-trained bergson_ray's tiny default model
#   ~/.cache/bergson-anchor/data/{pydoc,pydoc_query} its corpus and query set
#
# The shared anchor tool (../shared/tools/anchor/run_anchor.sh) trains its own tiny model
# for ~an hour on 2 cores; here the assets are bergson_ray's tiny default (the same kind
# of model and pydoc text, built in a minute), so any checkout can run the interop tests.
# pip's output goes to $ROOT/install.log.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${BERGSON_ANCHOR_ROOT:-$HOME/.cache/bergson-anchor}
VENV=$ROOT/anchor-venv
BERGSON_VERSION=2.5.1
TORCH_VERSION=2.13.0
LOG=$ROOT/install.log
mkdir -p "$ROOT"

if [[ ! -x $VENV/bin/bergson ]]; then
  echo "installing bergson $BERGSON_VERSION into $VENV (log: $LOG)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  echo "torch==$TORCH_VERSION" > "$ROOT/constraints.txt"
  {
    # torch first, pinned: any other torch drags in GBs of CUDA wheels
    "$VENV/bin/pip" install --disable-pip-version-check "torch==$TORCH_VERSION"
    "$VENV/bin/pip" install --disable-pip-version-check -c "$ROOT/constraints.txt" \
      "bergson==$BERGSON_VERSION" faiss-cpu
    # bergson depends on torchvision/torchaudio but never imports them; the wheels pip
    # picks are built for another torch and break `import transformers`
    "$VENV/bin/pip" uninstall -y torchvision torchaudio
  } > "$LOG" 2>&1 || { echo "bergson install failed; see $LOG" >&2; tail -20 "$LOG" >&2; exit 1; }
  "$VENV/bin/python" -c "import bergson" || { echo "bergson does not import" >&2; exit 1; }
fi

if [[ ! -f $ROOT/models/tiny-neox-trained/model.safetensors ]]; then
  echo "laying out bergson_ray's tiny default under $ROOT"
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python - "$ROOT" <<'PY'
import json, shutil, sys
from pathlib import Path

from bergson_ray.defaults.tiny import ensure_tiny_assets

root = Path(sys.argv[1])
assets = ensure_tiny_assets()
for src, dest in (  # the model last: its presence marks a finished layout
    (assets.corpus_dir, root / "data" / "pydoc"),
    (assets.query_dir, root / "data" / "pydoc_query"),
    (assets.model_dir, root / "models" / "tiny-neox-trained"),
):
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("cache-*.arrow"))
    # bergson's default --token_batch_size (2048) must fit the context: rotary positions
    # have no table, so a longer stated context changes no number below 512 tokens
    for name, key in (("config.json", "max_position_embeddings"),
                      ("tokenizer_config.json", "model_max_length")):
        if (tmp / name).is_file():
            cfg = json.loads((tmp / name).read_text())
            cfg[key] = max(int(cfg.get(key) or 0), 2048)
            (tmp / name).write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # whole or absent: the tests check for model.safetensors
PY
fi
echo "bergson anchor ready: $($VENV/bin/bergson --help >/dev/null 2>&1 && echo "$VENV/bin/bergson")"
