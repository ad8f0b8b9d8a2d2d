#!/usr/bin/env bash
# Set up, then run the quickstart: tiny model -> gradient store on a local Ray -> top-5 docs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/bergson-ray quickstart "$@"
