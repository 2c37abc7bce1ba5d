#!/usr/bin/env bash
# Issue 12 on a single GPU: `torchrun --nproc-per-node 1` through the data-parallel code path
# of `qlora run` (process group opened with NCCL, device_map per local rank, DDP trainer
# arguments), on a random Llama-3.2-1B shape, once per backend. Records each run's log, the
# last /metrics snapshot while it trained (peak reserved memory next to the planner's
# estimate) and the spec.
#   bash bench/ddp_gpu1.sh OUT_DIR [MODELS_DIR]
set -uo pipefail
out=${1:?usage: ddp_gpu1.sh OUT_DIR [MODELS_DIR]}
models=${2:-${TMPDIR:-/tmp}/models}
mkdir -p "$out"
python3 bench/random_models.py "$models" llama-3.2-1b >"$out/build.log" 2>&1 || { cat "$out/build.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/card.csv" 2>&1
python3 -c "import json,importlib.metadata as m; print(json.dumps({p: m.version(p) for p in ('torch','transformers','trl','peft','bitsandbytes','accelerate','unsloth')}))" >"$out/versions.json" 2>&1
rc_all=0
for backend in transformers unsloth; do
  work=$(mktemp -d)
  d="$out/$backend"; mkdir -p "$d"
  python3 - "$models/llama-3.2-1b" "$work/store" "$backend" >"$d/spec.yaml" <<'PY'
import sys, yaml
doc = yaml.safe_load(open("examples/tiny-cpu.yaml"))
s = doc["spec"]
doc["metadata"]["name"] = f"ddp1-{sys.argv[3]}"
s["model"]["source"] = sys.argv[1]
s["quantization"] = {"mode": "4bit"}
t = s["training"]
t.update(backend=sys.argv[3], learning_rate=2e-4, optimizer="adamw_8bit",
         gradient_checkpointing=True, max_steps=10, micro_batch_size="auto",
         gradient_accumulation_steps="auto", target_effective_batch_size=8, max_seq_length=512)
s["dataset"]["eval_fraction"] = 0.0
s["output"]["uri"] = f"file://{sys.argv[2]}"
s["metrics"] = {"enabled": True, "port": 9400}
s["resources"] = {"gpus_per_node": 1}
print(yaml.safe_dump(doc, sort_keys=False))
PY
  start=$(date +%s)
  QLORA_WORK_DIR="$work/work" QLORA_METRICS_BIND_ADDRESS=127.0.0.1 HF_HUB_OFFLINE=1 \
    timeout 120 python3 -m torch.distributed.run --nproc-per-node 1 --standalone \
    -m runner --log-format json run --spec "$d/spec.yaml" >"$d/run.log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    curl -sf http://127.0.0.1:9400/metrics >"$d/metrics.tmp" 2>/dev/null && mv "$d/metrics.tmp" "$d/metrics-last.txt"
    sleep 1
  done
  wait "$pid"; rc=$?
  echo "$backend: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
  grep -E '^qlora_(gpu_memory_peak_reserved_bytes|vram_estimate_bytes|rank_info|rank_gpu_memory_peak_reserved_bytes|train_step)[{ ]' "$d/metrics-last.txt" 2>/dev/null | tee -a "$out/summary.txt"

  [ "$rc" = 0 ] || rc_all=$rc
  rm -rf "$work"
done
exit "$rc_all"
