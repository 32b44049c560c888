#!/bin/bash
# LLaVA-NeXT (v1.6) defaults for the shared eval workflow (scripts/v1_5/eval/_common.sh documents
# every setting). The model, its anyres preprocessing and `image_sizes` come from the checkpoint's
# config; only the defaults differ: the checkpoint and the conversation template of its backbone.
export MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.6-vicuna-7b}
if [ -z "${CONV_MODE:-}" ]; then
    case "$(basename "${MODEL_PATH%/}" | tr 'A-Z' 'a-z')" in
        *mistral*) CONV_MODE=mistral_instruct ;;
        *34b*)     CONV_MODE=chatml_direct ;;
        *)         CONV_MODE=vicuna_v1 ;;
    esac
fi
export CONV_MODE
V15="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../v1_5/eval" && pwd)"
