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
# pip's own chatter (deprecation banners, resolver notes) goes to a log, not the terminal;
# a failure prints the log's tail
LOG=.venv/setup.log
pipq() {
  if ! .venv/bin/python -m pip install -q "$@" >>"$LOG" 2>&1; then
    echo "setup: pip install $* failed; the end of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
}
# a second run with the same pyproject.toml (test.sh after .ci/run's set-up) installs nothing
STAMP=.venv/setup.stamp
WANT="$(cat pyproject.toml; echo "$TORCH_SPEC")"
if [[ -f $STAMP && "$(cat "$STAMP")" == "$WANT" ]] && .venv/bin/python -c "import bergson_ray" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi
: >"$LOG"
echo "setup: installing into .venv (details in $LOG)"
pipq --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || pipq "$TORCH_SPEC"
# constrain torch to what is installed so no dependency can swap it for a CUDA build
.venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > .venv/torch-constraint.txt
pipq -c .venv/torch-constraint.txt -e ".[dev,serve]"
printf '%s' "$WANT" > "$STAMP"
