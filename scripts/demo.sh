#!/usr/bin/env bash
# scripts/demo.sh: everything needed to see qlora-runner work, from a fresh clone, on a CPU.
#   1. create .venv with the training extra (first run: a few minutes; then a no-op)
#   2. build the tiny Llama-shaped model from a config (no hub download) if it is missing
#   3. qlora run on examples/tiny-cpu.yaml: preflight, 4-bit QLoRA training, verification,
#      publish to file://.qlora-store/tiny-demo (a runs/<id>/ prefix, manifest.json last)
#   4. qlora verify the published adapter (manifest, every file's sha256 and size)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh train
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export QLORA_LOG_FORMAT="${QLORA_LOG_FORMAT:-text}"
model=.qlora-work/models/tiny-llama
.venv/bin/python -m runner.train.tiny "$model"
summary="$(.venv/bin/qlora run --spec examples/tiny-cpu.yaml)"
echo "$summary"
run_uri="$(.venv/bin/python -c 'import json,sys; print(json.loads(sys.argv[1])["run_uri"])' "$summary")"
.venv/bin/qlora verify "$run_uri"
echo
echo "done: the adapter is in ${run_uri#file://} (latest: .qlora-store/tiny-demo/latest.json)"
