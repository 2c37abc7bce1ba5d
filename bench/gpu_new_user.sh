#!/usr/bin/env bash
# What a new user tries on a GPU host: the CPU example's spec (examples/tiny-cpu.yaml) with a
# bigger shape (a random Llama-3.2-1B, no hub), backend and precision left to the runner,
# metrics on; `qlora run`, and `curl` on the metrics port while it trains.
#   bash bench/gpu_new_user.sh OUT_DIR [MODELS_DIR]
# Writes OUT_DIR/run.log (the job's log), OUT_DIR/metrics-while-training.txt and
# OUT_DIR/spec.yaml. Exits with the job's exit code.
set -uo pipefail
out=${1:?usage: gpu_new_user.sh OUT_DIR [MODELS_DIR]}
models=${2:-${TMPDIR:-/tmp}/models}
work=$(mktemp -d)
mkdir -p "$out"
python3 bench/random_models.py "$models" llama-3.2-1b >/dev/null 2>&1 || exit 1
python3 - "$models/llama-3.2-1b" "$work/store" >"$out/spec.yaml" <<'EOF'
import sys, yaml
doc = yaml.safe_load(open("examples/tiny-cpu.yaml"))
s = doc["spec"]
doc["metadata"]["name"] = "gpu-demo"
s["model"]["source"] = sys.argv[1]
s["quantization"] = {"mode": "4bit"}          # compute dtype: the runner's default for the card
t = s["training"]
t.pop("backend")                               # auto: Unsloth where it imports
t.pop("compute_dtype", None)
t.update(learning_rate=2e-4, optimizer="adamw_8bit", gradient_checkpointing=True, max_steps=40)
s["output"]["uri"] = f"file://{sys.argv[2]}"
s["metrics"] = {"enabled": True, "port": 9400}
print(yaml.safe_dump(doc, sort_keys=False))
EOF
QLORA_WORK_DIR="$work/work" QLORA_METRICS_BIND_ADDRESS=127.0.0.1 HF_HUB_OFFLINE=1 \
  python3 -m runner run --spec "$out/spec.yaml" >"$out/run.log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
  if curl -sf http://127.0.0.1:9400/metrics 2>/dev/null | grep -q '^qlora_train_step [1-9]'; then
    curl -s http://127.0.0.1:9400/metrics >"$out/metrics-while-training.txt"
    break
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.5
done
wait "$pid"
rc=$?
echo "qlora run exited $rc"
exit "$rc"
