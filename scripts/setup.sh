#!/usr/bin/env bash
# Set up .venv for llava-fitprune: the pinned stack, LLaVA (llava-torch, --no-deps), this package.
# `--hf`: set up .venv-hf instead, the transformers-native backend (llava_fitprune.adapters.hf) on
# transformers 5.x; tests: `.venv-hf/bin/python -m pytest -q tests_hf`.
# Idempotent; CPU torch by default. GPU users: see README "Install on a GPU machine".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

# The transformers-native backend's stack, in one list. No torchvision: the PyPI wheel is built for
# CUDA torch and breaks `import transformers.models.llava` on CPU torch; transformers works without it.
HF_PACKAGES="torch==${TORCH_VERSION:-2.13.0} transformers==5.24.0 accelerate sentencepiece protobuf pillow numpy pytest tqdm"

if [ "${1:-}" = "--hf" ]; then
  [ -x .venv-hf/bin/python ] || "$PYTHON" -m venv .venv-hf
  stamp=.venv-hf/.llava-fitprune-setup
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$HF_PACKAGES" ]; then
    .venv-hf/bin/python -m pip install -q --disable-pip-version-check $HF_PACKAGES
    echo "$HF_PACKAGES" > "$stamp"
  fi
  # setup.py pins the LLaVA backend's transformers 4.37.2: --no-deps keeps 5.x here
  .venv-hf/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  .venv-hf/bin/python -c "import torch, transformers, llava_fitprune.adapters.hf.loading; print('llava-fitprune (hf backend) | torch', torch.__version__, '| transformers', transformers.__version__)"
  exit 0
elif [ $# -gt 0 ]; then
  echo "usage: bash scripts/setup.sh [--hf]" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
stamp=.venv/.llava-fitprune-setup
want="torch==${TORCH_VERSION:-2.13.0} transformers==4.37.2 tokenizers==0.15.1 sentencepiece protobuf accelerate==0.21.0 pillow shortuuid tqdm numpy matplotlib pytest"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want llava-torch==1.2.2.post1" ]; then
  $PIP install -q --disable-pip-version-check $want
  # llava-torch's metadata pins torch 2.0.1 and gradio: its code runs on the stack above.
  $PIP install -q --disable-pip-version-check --no-deps llava-torch==1.2.2.post1
  echo "$want llava-torch==1.2.2.post1" > "$stamp"
fi
$PIP install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
.venv/bin/python -c "import torch, transformers, llava, llava_fitprune; print('llava-fitprune', llava_fitprune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
