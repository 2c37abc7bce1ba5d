"""The numbers of one ``qlora run`` log (JSON lines) that the VRAM bound is checked on.

    python3 bench/run_log_summary.py RUN_LOG > summary.json

Reads the re-plan record (the estimate and its CUDA-context term, which lies outside PyTorch's
allocator), the phase records' allocator peaks, and the "training done" record: its message
(steps, loss, time) and its allocator report (``runner.train.allocator``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def summarize(lines: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        plan = rec.get("replan") or rec.get("plan")
        if plan:  # the re-plan comes after the first plan: the last one wins
            terms = {t["name"]: t["bytes"] for t in plan.get("vram_terms", [])}
            out["plan_source"] = "replan" if "replan" in rec else "plan"
            out["estimate_bytes"] = plan["vram_estimate_bytes"]
            out["cuda_context_bytes"] = terms.get("cuda_context", 0)
            out["micro_batch"] = plan["micro_batch_size"]
            out["accumulation"] = plan["gradient_accumulation_steps"]
            out["gradient_checkpointing"] = plan.get("gradient_checkpointing")
            out["peak_micro_batch_tokens"] = plan.get("peak_micro_batch_tokens")
            out["gpu_class"] = plan["gpu_class"]["name"]
        for key, value in rec.items():
            if key.endswith(("_peak_reserved_bytes", "_peak_allocated_bytes")):
                out[key] = value
        if isinstance(rec.get("allocator"), dict) and "backend" in rec["allocator"]:
            out["allocator"] = rec["allocator"]
        if str(rec.get("msg", "")).startswith("training done"):
            out["training_done"] = rec["msg"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_log", type=Path)
    ns = ap.parse_args()
    try:
        text = ns.run_log.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        ap.error(f"{ns.run_log}: {e.strerror or e}")  # exit 2
    print(json.dumps(summarize(text.splitlines()), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
