#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on a bare GPU machine (Python 3.12 there; no network), into .whl/
# (ignored by git; the device tool carries it: carry [".whl"]). Run here, once, from anywhere:
#   bash bench/gpu_check_wheels.sh
# DeepSpeed is a source distribution: built here into a pure-Python wheel (no ops compiled; ZeRO-3 with
# torch's AdamW needs none). pydantic-core is the only compiled one: fetched for CPython 3.12, x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "hjson==3.1.0" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" "typing-extensions==4.16.0"
ls -la .whl
du -sh .whl
