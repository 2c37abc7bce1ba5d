#!/usr/bin/env bash
# The quality grid on the GPU host, in two device calls: the model (98 MB) is larger than one
# call's 64 MiB transfer, so the GGUF travels in two halves. Each call carries one folder:
#   stage1: whl/ (gguf, bitsandbytes, trl, datasets, pydantic and their small dependencies),
#           runner/ and part1 (bytes 0..49e6 of the GGUF)
#           -> installs the wheels into /tmp/site, parks part1 in /tmp/qm, checks that the
#              runner imports and that bitsandbytes quantizes on this GPU
#   stage2: runner/, bench/quality/, data/ (quality.py data) and part2 (the rest of the GGUF),
#           made within the host's warm window (files outside the carried folder stay)
#           -> joins the halves, checks sha256 and runs quality.py drive into OUT
#   bash bench/quality/gpu.sh stage1 OUT
#   QUALITY_BUDGET_S=300 bash bench/quality/gpu.sh stage2 OUT [drive options...]
# bench/quality/stage.sh builds both folders under /work/main/.dev/.
set -uo pipefail
model=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
stage=${1:?stage1|stage2}
out=${2:?OUT}
shift 2
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD XDG_CACHE_HOME=/tmp/qcache HF_HUB_OFFLINE=1 \
  HF_DATASETS_CACHE=/tmp/qcache/datasets QLORA_WORK_DIR=/tmp/qwork PYTHONUNBUFFERED=1 \
  OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
case "$stage" in
  stage1)
    mkdir -p /tmp/qm
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site whl/*.whl \
      || exit 1
    cp part1 /tmp/qm/part1 && ls -la /tmp/qm
    python3 - <<'EOF' 2>&1 | tee "$out/stage1.log"
import time
t = time.monotonic()
import torch, bitsandbytes.functional as F, gguf, trl, datasets, peft  # noqa: E401
from runner import recipe  # noqa: F401
from runner.train import transformers_backend  # noqa: F401
x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
q, s = F.quantize_4bit(x, quant_type="nf4")
err = (F.dequantize_4bit(q, s) - x).abs().mean().item()
print(f"stage1: imports + nf4 round trip ok (mean abs error {err:.4f}) in {time.monotonic() - t:.1f}s")
EOF
    ;;
  stage2)
    cat /tmp/qm/part1 part2 >"/tmp/qm/$model" || exit 1
    echo "$sha  /tmp/qm/$model" | sha256sum -c - || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.csv"
    python3 -c 'import json; from runner.recipe import library_versions as v; print(json.dumps(v()))' \
      >"$out/versions.json"
    timeout "$(( ${QUALITY_BUDGET_S:-300} + 45 ))" python3 bench/quality/quality.py drive \
      --gguf "/tmp/qm/$model" --data data --out "$out" --budget-s "${QUALITY_BUDGET_S:-300}" \
      "$@" >"$out/drive.log" 2>&1
    echo "drive exited $?"
    grep -E '^\[|^drive' "$out/drive.log" | tail -40 ;;
esac
