#!/usr/bin/env bash
# Set up a virtual environment for llava-fitprune. Idempotent; CPU torch by default.
#   bash scripts/setup.sh        .venv: the LLaVA stack (transformers 4.37.2, llava-torch --no-deps), this package
#   bash scripts/setup.sh --hf   .venv-hf: the transformers-native stack (transformers 5.x, lmms-eval), this package
# GPU users: see docs/speed.md "Install on a GPU machine".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH="torch==${TORCH_VERSION:-2.13.0}"

# The two stacks. Each list is the whole pinned install of its venv.
LLAVA_PACKAGES="$TORCH transformers==4.37.2 tokenizers==0.15.1 sentencepiece protobuf accelerate==0.21.0 pillow shortuuid tqdm numpy matplotlib pytest"
# filelock<4: lmms-eval 0.7.3's evaluator patches filelock._api.FileLockMeta, which filelock 4 no longer has
# ("No module named 'filelock._api'" at every evaluation).
# sentencepiece 0.2.0: later wheels carry protobuf-7 generated code ("incompatible Protobuf Gencode/Runtime
# versions") and lmms-eval's wandb keeps protobuf 6, so transformers 5 could not convert a sentencepiece
# tokenizer.model (LLaVA's: convert.py's processor, `llava-fitprune accuracy`). matplotlib: fit's and bench's plots.
HF_PACKAGES="$TORCH transformers==5.24.0 lmms-eval==0.7.3 filelock<4 accelerate sentencepiece==0.2.0 protobuf pillow numpy matplotlib pytest tqdm"

case "${1:-}" in
  "") venv=.venv ;;
  --hf) venv=.venv-hf ;;
  *) echo "usage: bash scripts/setup.sh [--hf]" >&2; exit 2 ;;
esac
if [ ! -x "$venv/bin/python" ]; then
  "$PYTHON" -m venv "$venv"
fi
PIP="$venv/bin/python -m pip"
stamp=$venv/.llava-fitprune-setup
if [ "$venv" = .venv ]; then
  want="$LLAVA_PACKAGES llava-torch==1.2.2.post1"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    $PIP install -q --disable-pip-version-check $LLAVA_PACKAGES
    # llava-torch's metadata pins torch 2.0.1 and gradio: its code runs on the stack above.
    $PIP install -q --disable-pip-version-check --no-deps llava-torch==1.2.2.post1
    echo "$want" > "$stamp"
  fi
  check="import torch, transformers, llava, llava_fitprune"
else
  want="$HF_PACKAGES -torchvision-unless-it-imports -timm-with-it"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    $PIP install -q --disable-pip-version-check $HF_PACKAGES
    # lmms-eval pulls PyPI's torchvision, built against CUDA torch: with a CPU torch it does not import
    # ("operator torchvision::nms does not exist") and breaks `import transformers.models.llava`; the
    # matching CPU wheel is not on PyPI. Neither transformers nor lmms-eval needs it for this package.
    # timm (an lmms-eval requirement none of its paths here imports) needs torchvision, and accelerate's
    # command line imports timm whenever it is installed: `accelerate launch` would fail with "No module
    # named 'torchvision'". So both go where torchvision does not import (a CUDA torch keeps them).
    if ! "$venv/bin/python" -c "import torchvision" >/dev/null 2>&1; then
      $PIP uninstall -q -y torchvision timm 2>/dev/null || true
    fi
    echo "$want" > "$stamp"
  fi
  # accelerate_cli: what `accelerate launch` imports (timm, when installed)
  check="import torch, transformers, lmms_eval, llava_fitprune, transformers.models.llava, accelerate.commands.accelerate_cli"
fi
# --no-deps: setup.py pins the LLaVA stack's transformers 4.37.2, which .venv-hf must not get.
$PIP install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
"$venv/bin/python" -c "$check; print('llava-fitprune', llava_fitprune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
