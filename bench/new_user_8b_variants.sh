#!/usr/bin/env bash
# One device call: bench/gpu_new_user_8b.sh three times on the same random 8B model, one after
# another (messages with completion-only loss, the same rows as text, messages with loss on
# every token), each into OUT/VARIANT/ and packed as OUT/VARIANT.tgz (the tool returns few
# files), with the phase peaks of each run printed. Carry .whl.
set -uo pipefail
out=${1:?OUT}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  && python3 -m compileall -q /tmp/site >/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/card.csv"
python3 -c 'import json; from runner.recipe import library_versions as v; print(json.dumps(v()))' \
  >"$out/versions.json"
# VARIANTS="80gb-cold 80gb-warm": the spec pinned to the 80GB class, with a kernel-cache
# directory, cold and then warm (the runs of bench/speed_data.py had both).
for v in ${VARIANTS:-messages text messages-all}; do
  case $v in
    messages) env=() ;;
    text) env=(FORMAT=text) ;;
    messages-all) env=(TRAIN_ON=all) ;;
    80gb-*) env=(GPU_CLASS=80GB QLORA_COMPILE_CACHE_DIR=/tmp/nu-cache) ;;
    # the allocator's history, summarised by bench/memory_snapshot_summary.py
    history) env=(QLORA_CUDA_MEMORY_HISTORY=/tmp/nu-snap/history.pickle) ;;
    # the allocator variable set before Python starts, not by the runner
    env-alloc) env=(PYTORCH_ALLOC_CONF=expandable_segments:True) ;;
    steps12) env=(MAX_STEPS=12) ;;  # as bench/speed_data.py runs it: 12 steps
  esac
  env "${env[@]}" timeout 200 bash bench/gpu_new_user_8b.sh "/tmp/nu/$v" /tmp/models >/dev/null 2>&1
  echo "$v: exit $?"
  grep -oE '"(training|evaluating)_peak_(reserved|allocated)_bytes": [0-9]+|re-planned[^"]*|planned for this[^"]*|resolved: plan.json[^"]*' \
    "/tmp/nu/$v/run.log" | head -8
  grep -oE '"allocator": \{[^}]*\}' "/tmp/nu/$v/run.log" | head -2
  if [ -f /tmp/nu-snap/history.pickle ]; then
    python3 bench/memory_snapshot_summary.py /tmp/nu-snap/history.pickle >"/tmp/nu/$v/history.txt" 2>&1
    head -60 "/tmp/nu/$v/history.txt"
    gzip -c /tmp/nu-snap/history.pickle >"/tmp/nu/$v/history.pickle.gz"
    rm -f /tmp/nu-snap/history.pickle
    # the tool returns files up to 16 MiB: keep the pickle only when it fits
    [ "$(stat -c %s "/tmp/nu/$v/history.pickle.gz")" -lt 15000000 ] || rm -f "/tmp/nu/$v/history.pickle.gz"
  fi
  tar czf "$out/$v.tgz" -C /tmp/nu "$v"
done
