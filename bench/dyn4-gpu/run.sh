#!/usr/bin/env bash
# The dynamic 4-bit GPU tests on the device host (one call): tests/test_gpu_unsloth.py's
# dynamic-4bit and pre-quantized cases, driven without pytest's plugins (the host may lack them).
#   cd .dev/dyn4 && bash bench/dyn4-gpu/run.sh "$OUT"
set -uo pipefail
out=${1:?OUT}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site ../../.whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.csv" 2>&1
python3 -c 'import json; from runner.recipe import library_versions as v; print(json.dumps(v()))' \
  >"$out/versions.json" 2>&1
if ! python3 -c 'import pytest' 2>/dev/null; then  # a stub for the module-level marks only
  mkdir -p /tmp/stub && printf '%s\n' 'class _M:' '    def __getattr__(self, n): return self' \
    '    def __call__(self, *a, **k): return self' 'mark = _M()' >/tmp/stub/pytest.py
  export PYTHONPATH=$PYTHONPATH:/tmp/stub
fi
python3 - "$out" <<'PY' 2>&1 | tee "$out/tests.log" | tail -60
import pathlib, sys, tempfile, time, traceback
import tests.test_gpu_unsloth as t
for name in ("test_dynamic_4bit_through_unsloth_keeps_the_ranked_modules",
             "test_prequantized_checkpoint_loads_as_is"):
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="dyn4-"))
    start = time.monotonic()
    try:
        getattr(t, name)(tmp)
        print(f"PASS {name} {time.monotonic() - start:.1f}s", flush=True)
    except BaseException:
        traceback.print_exc()
        print(f"FAIL {name} {time.monotonic() - start:.1f}s", flush=True)
    for m in tmp.rglob("manifest.json"):
        (pathlib.Path(sys.argv[1]) / f"{name}.manifest.json").write_bytes(m.read_bytes())
PY
