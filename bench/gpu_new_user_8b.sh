#!/usr/bin/env bash
# Issue 13 as a new user tries it on a GPU host: the 8B example (examples/llama-3.1-8b.yaml)
# with a realistic-length chat dataset, `qlora plan --data` first, then `qlora run`, watching
# /metrics while it trains. The model is a random Llama-3.1-8B shape (no hub); the dataset is
# 600 two-turn chat rows whose token counts follow the speed bench's lognormal
# (bench/speed_data.py: mean ~540, p90 ~1,150, capped at 2,048).
#   bash bench/gpu_new_user_8b.sh OUT_DIR [MODELS_DIR]
# Writes OUT_DIR/spec.yaml, data-head.jsonl, plan.txt (qlora plan --data), run.log,
# metrics-while-training.txt (the first scrape after step 5), metrics-scrapes.txt (step, VRAM
# and tokens/s every 2 s), manifest.json. Exits with the job's exit code.
set -uo pipefail
out=${1:?usage: gpu_new_user_8b.sh OUT_DIR [MODELS_DIR]}
models=${2:-${TMPDIR:-/tmp}/models}
shape=${SHAPE:-llama-3.1-8b}  # SHAPE=tiny tries the script on a CPU
format=${FORMAT:-messages}    # FORMAT=text: the same token counts as plain text rows
train_on=${TRAIN_ON:-}        # TRAIN_ON=all: loss on every token (default: the spec's)
gpu_class=${GPU_CLASS:-}      # GPU_CLASS=80GB: resources.gpu_class (plan for that class)
max_steps=${MAX_STEPS:-}      # MAX_STEPS=12: training.max_steps instead of one epoch
work=$(mktemp -d)
mkdir -p "$out"
[ -f "$models/$shape/config.json" ] \
  || python3 bench/random_models.py "$models" "$shape" >"$out/models.log" 2>&1 || exit 1
python3 - "$work/train.jsonl" "$format" <<'EOF'
import json, random, sys
sys.path.insert(0, "bench")
from speed_data import realistic_lengths
rng = random.Random(7)
with open(sys.argv[1], "w") as fh:
    for n in realistic_lengths(600, 2048, seed=3):
        # the chat template adds ~12 tokens; a quarter of the rest is the question
        words = max(4, n - 12)
        q = max(2, words // 4)
        say = lambda k: " ".join(f"w{rng.randrange(256)}" for _ in range(k))
        if sys.argv[2] == "text":  # BOS and EOS around the words: n tokens
            fh.write(json.dumps({"text": say(max(2, n - 2))}) + "\n")
            continue
        fh.write(json.dumps({"messages": [
            {"role": "user", "content": say(q)},
            {"role": "assistant", "content": say(words - q)},
        ]}) + "\n")
EOF
head -c 2000 "$work/train.jsonl" >"$out/data-head.jsonl"
python3 - "$models/$shape" "$work/train.jsonl" "$work/store" "$format" "$train_on" "$gpu_class" "$max_steps" \
  >"$out/spec.yaml" <<'EOF'
import sys, yaml
doc = yaml.safe_load(open("examples/llama-3.1-8b.yaml"))
s = doc["spec"]
s["model"]["source"] = sys.argv[1]
s["dataset"]["sources"] = [sys.argv[2]]
s["dataset"]["format"] = sys.argv[4]
if sys.argv[4] == "text" or sys.argv[5]:
    s["dataset"]["train_on"] = "all"
if sys.argv[6]:
    s["resources"]["gpu_class"] = sys.argv[6]
if sys.argv[7]:
    s["training"]["max_steps"] = int(sys.argv[7])
s["output"]["uri"] = f"file://{sys.argv[3]}"
s["metrics"] = {"enabled": True, "port": 9400}
print(yaml.safe_dump(doc, sort_keys=False))
EOF
export QLORA_WORK_DIR="$work/work" QLORA_METRICS_BIND_ADDRESS=127.0.0.1 HF_HUB_OFFLINE=1
python3 -m runner plan "$out/spec.yaml" --data "$work/train.jsonl" >"$out/plan.txt" 2>&1
echo "qlora plan exited $?" >>"$out/plan.txt"
python3 -m runner run --spec "$out/spec.yaml" >"$out/run.log" 2>&1 &
pid=$!
got=0
: >"$out/metrics-scrapes.txt"
for _ in $(seq 1 400); do
  page=$(curl -sf http://127.0.0.1:9400/metrics 2>/dev/null)
  if [ -n "$page" ]; then
    { date +%s; grep -E '^qlora_(train_step|train_tokens_per_second|train_eta_seconds|vram_estimate_bytes|gpu_memory_(allocated|reserved|peak_reserved)_bytes)[{ ]|^qlora_job_phase\{.*\} 1' <<<"$page"; } \
      >>"$out/metrics-scrapes.txt"
    if [ "$got" = 0 ] && grep -qE '^qlora_train_step ([5-9]|[1-9][0-9])' <<<"$page"; then
      printf '%s\n' "$page" >"$out/metrics-while-training.txt"
      got=1
    fi
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 2
done
wait "$pid"
rc=$?
find "$work/store" -name manifest.json -path '*runs*' -exec cp {} "$out/manifest.json" \; 2>/dev/null
echo "qlora run exited $rc"
cat "$out/plan.txt"
grep -E '"msg": "(phase|re-plan|plan|resolved|training done|published)' "$out/run.log" | cut -c1-400 | tail -20
exit "$rc"
