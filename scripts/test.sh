#!/usr/bin/env bash
# Set up both stacks and run both suites: tests/ in .venv (haotian-liu LLaVA, transformers 4.37.2) and
# tests_hf/ in .venv-hf (transformers-native models, lmms-eval). Exits non-zero if either suite fails or
# runs no test (pytest's exit code 5 counts as a failure here).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
bash scripts/setup.sh --hf || exit 1
failed=()
run() {  # run VENV DIR
  local rc=0
  "$1/bin/python" -m pytest -q "$2" || rc=$?
  if [ "$rc" -eq 5 ]; then echo "$2: no test ran (pytest exit code 5)" >&2; fi
  if [ "$rc" -ne 0 ]; then failed+=("$2 (exit $rc)"); fi
}
run .venv tests
run .venv-hf tests_hf
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
