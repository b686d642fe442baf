#!/usr/bin/env bash
# The benchmark suite, one command: JSON results in bench/results/ (about 45 min on a 2-core CPU).
#   bash bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python bench/bench_scoring.py --out bench/results/scoring.json
python bench/bench_pipeline.py
python bench/bench_zoo.py --rounds 3
python bench/bench_zero3_answers.py
if bash scripts/setup_vllm.sh; then
  .venv-vllm/bin/python bench/bench_generation.py
fi
