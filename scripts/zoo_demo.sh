#!/usr/bin/env bash
# The demo zoo: train three SmolLM2-135M-Instruct source adapters with `titok sft` (once; reused),
# then migrate all three to Gemma-3-270M in one job (configs/zoo-demo.yaml).
#   bash scripts/zoo_demo.sh [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
for task in boolean_expressions multistep_arithmetic_two object_counting; do
  if [ ! -f "runs/zoo-demo-sources/$task/adapter_config.json" ]; then
    titok sft --base smollm2-135m --task "$task" --out "runs/zoo-demo-sources/$task"
  fi
done
titok migrate --config configs/zoo-demo.yaml "$@"
