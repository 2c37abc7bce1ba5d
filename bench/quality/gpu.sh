#!/usr/bin/env bash
# The quality grid on the GPU host, in two device calls (the model is bigger than one call's
# transfer). Run from a copy of the repository that carries data/ (examples/quartz/prepare.py
# output), whl/ (gguf, bitsandbytes, trl, datasets and their small dependencies) and one half
# of the GGUF file as part1 or part2:
#   bash bench/quality/gpu.sh stage1          # installs the wheels, parks part1 in /tmp/qm
#   bash bench/quality/gpu.sh stage2 OUT      # joins, checks sha256, runs the grid into OUT
set -uo pipefail
model=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
case "${1:?stage1|stage2}" in
  stage1)
    mkdir -p /tmp/qm
    python3 -m pip install -q --no-index --no-deps --target /tmp/site whl/*.whl || exit 1
    cp part1 /tmp/qm/part1 && ls -la /tmp/qm ;;
  stage2)
    out=${2:?OUT}; mkdir -p "$out"
    cat /tmp/qm/part1 part2 >"/tmp/qm/$model"
    echo "$sha  /tmp/qm/$model" | sha256sum -c - || exit 1
    export PYTHONPATH=/tmp/site:$PWD XDG_CACHE_HOME=/tmp/qcache HF_HUB_OFFLINE=1 \
      QLORA_WORK_DIR=/tmp/qwork
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.csv"
    python3 -c 'import json; from runner.recipe import library_versions as v; print(json.dumps(v()))' \
      >"$out/versions.json"
    timeout "${QUALITY_TIMEOUT_S:-420}" python3 bench/quality/quality.py drive \
      --gguf "/tmp/qm/$model" --data data --out "$out" --budget-s "${QUALITY_BUDGET_S:-330}" \
      >"$out/drive.log" 2>&1
    echo "drive exited $?"; tail -20 "$out/drive.log" ;;
esac
