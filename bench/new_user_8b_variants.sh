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
  esac
  env "${env[@]}" timeout 170 bash bench/gpu_new_user_8b.sh "/tmp/nu/$v" /tmp/models >/dev/null 2>&1
  echo "$v: exit $?"
  grep -oE '"(training|evaluating)_peak_(reserved|allocated)_bytes": [0-9]+|re-planned[^"]*|planned for this[^"]*|resolved: plan.json[^"]*' \
    "/tmp/nu/$v/run.log" | head -8
  tar czf "$out/$v.tgz" -C /tmp/nu "$v"
done
