#!/usr/bin/env bash
# Build the virtual environment of one framework integration, under .venvs/<framework> (ignored by git):
#
#   scripts/make_integration_env.sh verl       # verl 0.9.1 and its pins (transformers < 5.11)
#   scripts/make_integration_env.sh axolotl    # axolotl 0.19.0 and its pins (transformers 5.16.1, TRL 1.9.0)
#
# Each framework pins transformers / TRL / datasets versions that differ from the project's, so each gets an
# environment of its own. torch is pinned to 2.13.0 everywhere (a constraints file): on this project's CPU
# machines that is a local CPU wheel, and any other version would pull several GB of CUDA packages.
# pear-data itself goes in last with --no-deps (editable), on top of the framework's versions.
# The opt-in tests (docs/integrations.md) run with: PEAR_INTEGRATION_TESTS=1 .venvs/<framework>/bin/python -m pytest ...
set -euo pipefail
cd "$(dirname "$0")/.."
framework=${1:?usage: scripts/make_integration_env.sh verl|axolotl}
env=.venvs/$framework
PYTHON=${PYTHON:-python3}
[ -x "$env/bin/python" ] || "$PYTHON" -m venv "$env"
pip() { "$env/bin/python" -m pip --disable-pip-version-check -q "$@"; }
constraints="$env/constraints.txt"
echo "torch==2.13.0" >"$constraints"
pip install --upgrade pip
pip install "torch==2.13.0"
case $framework in
  verl)
    pip install -c "$constraints" "verl==0.9.1" uvicorn fastapi  # imported by its SFT trainer, not declared
    ;;
  axolotl)
    # axolotl's requirements include CUDA-only packages (xformers, flash-linear-attention, liger-kernel, vllm-era
    # pins) that would replace the CPU torch: install axolotl with --no-deps, then what its SFT path imports.
    pip install -c "$constraints" --no-deps "axolotl==0.19.0" "axolotl-contribs-lgpl==0.0.7" "axolotl-contribs-mit==0.0.6"
    pip install -c "$constraints" "transformers==5.16.1" "trl==1.9.0" "datasets==4.8.4" "accelerate==1.13.0" \
      "peft==0.20.0" "tokenizers==0.23.1" "huggingface_hub==1.17.0" "pydantic==2.12.5" "PyYAML==6.0.3" \
      "typer==0.25.1" "packaging==26.0" "python-dotenv==1.0.1" "numba>=0.63.1,<1.0" "numpy>=2.1,<3.0" \
      addict fire requests einops colorama scipy art fastcore sentencepiece tensorboard "posthog==6.7.11" \
      "optimum==1.16.2" "evaluate==0.4.1" "zstandard==0.22.0" "schedulefree==1.4.1" "torchao==0.17.0" \
      "bitsandbytes==0.50.2" "triton>=3.4.0" wandb
    ;;
  *)
    echo "unknown framework '$framework': use verl or axolotl" >&2
    exit 2
    ;;
esac
pip install -c "$constraints" "pyarrow>=15" "rich>=13" "typer>=0.12" "pyyaml>=6" "huggingface_hub>=0.24" "pytest>=8" safetensors
pip install --no-deps -e .
"$env/bin/python" -c "import importlib.metadata as m, torch; print('$framework', m.version('$framework'), \
'transformers', m.version('transformers'), 'torch', torch.__version__)"
