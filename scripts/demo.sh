#!/usr/bin/env bash
# README's first command: install (once), then run the demo on this machine's CPU.
#   bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
titok demo-excess "$@"
