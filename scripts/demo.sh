#!/usr/bin/env bash
# README's first command: install (once), train a source adapter if there is none, then transplant it
# from SmolLM2-135M-Instruct to Gemma-3-270M on this machine's CPU (local Ray).
#   bash scripts/demo.sh [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ ! -f runs/demo/source-adapter/adapter_config.json ]; then
  titok sft --base smollm2-135m --task boolean_expressions --out runs/demo/source-adapter
fi
titok transplant --config configs/demo.yaml "$@"
