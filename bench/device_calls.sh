#!/usr/bin/env bash
# The device calls of one GPU session, back to back on one warm host (it is released after
# 30 s idle, and /tmp stays between calls while it is held):
#   speed OUT     wheels into /tmp/site; on the same realistic rows: qlora run with the
#                 24GB-class and the 80GB-class plans (data-aware), qlora run as it was before
#                 issue 13 (qlora-today: 24GB class, fixed-length plan, every layer
#                 checkpointed, no varlen patch, default allocator), bare Unsloth 2 x 8 and
#                 plain HF + TRL 2 x 8 (issue 13's ratios, steady MFU and 80GB estimate; no
#                 profiler, so every step is a clean step)
#   speed-hf OUT  the 24GB-class plan and plain HF + TRL 2 x 8 alone, on the same rows
#   park OUT      parks the GGUF's first half in /tmp/qm
#   quality OUT   bench/quality/gpu.sh stage2 (more seeds of the grid, --jobs) and, beside it,
#                 the Gemma 3 1B fixed-length VRAM points (a per-process allocator peak: the
#                 grid's work on the same card does not change it) and the pre-quantized
#                 checkpoint GPU test
#   gemma OUT     wheels into /tmp/site; Gemma 3 1B fixed-length points the estimator's Gemma
#                 terms were not fitted to, and Gemma 3 4B (its language model) points
# Carry: speed .whl; gemma .whl; park .dev/qgrid1 (part1); quality .dev/qgrid (bench/quality/stage.sh).
set -uo pipefail
call=${1:?speed|park|quality}
out=${2:?OUT}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
versions() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/card.csv" 2>&1
  python3 -c 'import json; from runner.recipe import library_versions as v; print(json.dumps(v()))' \
    >"$out/versions.json" 2>&1
}
speed() {  # speed NAME BUDGET RUNNERS: speed_data.py into /tmp/NAME, packed as one file
  local name=$1 budget=$2 runners=$3
  timeout $((budget + 60)) python3 bench/speed_data.py --out "/tmp/$name" --models /tmp/models \
    --budget-s "$budget" --steps 12 --warm 4 --no-varlen-check --profile "" \
    --runners "$runners" >"/tmp/$name.log" 2>&1
  echo "speed_data exited $?" >>"/tmp/$name.log"
  cp "/tmp/$name/results.jsonl" "$out/$name-results.jsonl" 2>/dev/null
  tar czf "$out/$name.tgz" -C /tmp "$name" "$name.log"
  grep -E '^\{"runner"|^total|exited' "/tmp/$name.log" | cut -c1-700
}
wheels() {
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && python3 -m compileall -q /tmp/site >/dev/null
}
points() {  # points SHAPE SEQxMB,... : one vram_grid worker (Unsloth), into OUT/SHAPE-points.jsonl
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTORCH_ALLOC_CONF= \
    timeout 400 python3 bench/vram_grid.py worker --shape "$1" --backend unsloth \
    --model-dir "/tmp/models/$1" --points "$2" --results "$out/$1-points.jsonl" --steps 3 \
    --concurrent >"/tmp/$1.log" 2>&1
  echo "$1 worker exited $?" >>"/tmp/$1.log"
  tail -c 15000 "/tmp/$1.log" >"$out/$1.log"
}
case "$call" in
  gemma)
    wheels
    versions
    python3 bench/random_models.py /tmp/models gemma-3-1b gemma-3-4b >"$out/models.log" 2>&1
    points gemma-3-1b 1024x4,4096x1,4096x2,2048x8,16384x1 &
    points gemma-3-4b 2048x1,2048x4,4096x2,8192x2 &
    wait
    grep -hE 'reserved|exited|Error' /tmp/gemma-3-1b.log /tmp/gemma-3-4b.log | tail -30 ;;
  speed)
    wheels
    versions
    speed speed 470 qlora-24gb,qlora-80gb,qlora-today,unsloth-2x8,hf-2x8 ;;
  speed-hf)  # the 24GB plan against plain HF + TRL 2 x 8 alone (when speed's budget missed it)
    wheels
    versions
    speed speed-hf 330 qlora-24gb,hf-2x8 ;;
  park)
    mkdir -p /tmp/qm && cp .dev/qgrid1/part1 /tmp/qm/part1 && ls -la /tmp/qm ;;
  quality)
    python3 bench/random_models.py /tmp/models gemma-3-1b >/tmp/gemma.log 2>&1
    (HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTORCH_ALLOC_CONF= \
      timeout 420 python3 bench/vram_grid.py worker --shape gemma-3-1b --backend unsloth \
      --model-dir /tmp/models/gemma-3-1b --points 2048x1,2048x4,8192x2 \
      --results "$out/gemma-points.jsonl" --steps 3 --concurrent >>/tmp/gemma.log 2>&1
     echo "gemma worker exited $?" >>/tmp/gemma.log) &
    gemma=$!
    mkdir -p /tmp/stub  # the host may lack pytest: a stub for the module-level marks only
    python3 -c 'import pytest' 2>/dev/null || printf '%s\n' 'class _M:' \
      '    def __getattr__(self, n): return self' '    def __call__(self, *a, **k): return self' \
      'mark = _M()' >/tmp/stub/pytest.py
    (PYTHONPATH=$PYTHONPATH:/tmp/stub timeout 400 python3 - <<'PY' >"$out/prequant.log" 2>&1) &
import json, pathlib, tempfile, time, traceback
import tests.test_gpu_unsloth as t
tmp = pathlib.Path(tempfile.mkdtemp(prefix="prequant-"))
start = time.monotonic()
try:
    t.test_prequantized_checkpoint_loads_as_is(tmp)
    print(f"PASS test_prequantized_checkpoint_loads_as_is {time.monotonic() - start:.1f}s")
except BaseException:
    traceback.print_exc()
    print(f"FAIL test_prequantized_checkpoint_loads_as_is {time.monotonic() - start:.1f}s")
for m in (tmp / "store").rglob("manifest.json"):
    doc = json.loads(m.read_text())  # checkpoint manifests have no training section
    if "training" in doc:
        print(json.dumps(doc["training"].get("dynamic_4bit"))[:3000])
PY
    prequant=$!
    (cd .dev/qgrid && QUALITY_BUDGET_S=${QUALITY_BUDGET_S:-400} bash bench/quality/gpu.sh stage2 \
      "$out/quality" "${@:3}")
    wait "$gemma" "$prequant"
    tail -c 20000 /tmp/gemma.log >"$out/gemma.log"
    grep -E 'reserved|exited|Error' /tmp/gemma.log | tail -20
    tail -5 "$out/prequant.log" | cut -c1-600 ;;
esac
