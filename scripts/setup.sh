#!/usr/bin/env bash
# Create ./.venv (if missing) and install bergson_ray with its test tools.
# torch is installed FIRST and pinned: on a CPU machine torch==2.13.0 is the local
# CPU build; letting pip resolve torch itself would pull several GB of CUDA wheels.
# GPU users: install the CUDA torch wheel of your choice first, then `pip install -e .[faiss-gpu]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$TORCH_SPEC"
# constrain torch to what is installed so no dependency can swap it for a CUDA build
.venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > .venv/torch-constraint.txt
.venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -e ".[dev,serve]"
