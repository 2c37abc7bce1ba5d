"""Print the speed table and the target ratios from ``bench/speed/results.jsonl``.

The README's benchmark numbers are this script's output on the committed data, so they can be
re-derived without a GPU: ``python3 bench/summarize.py [bench/speed/results.jsonl]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 2**30


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else Path(__file__).parent / "speed" / "results.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by = {(r["shape"], r["runner"]): r for r in rows if "variant" not in r}
    print("| shape | runner | tokens/s steady | tokens/s whole train | MFU steady | peak VRAM GiB |")
    print("|---|---|---|---|---|---|")
    for (shape, runner), r in sorted(by.items()):
        peak = r.get("max_memory_reserved_bytes") or r.get("qlora_gpu_memory_peak_reserved_bytes")
        print(
            f"| {shape} | {runner} | {r.get('steady_tokens_per_s', 0):,.0f} | "
            f"{r.get('tokens_per_s', 0):,.0f} | {100 * (r.get('steady_mfu') or 0):.1f}% | "
            f"{(peak or 0) / GIB:.2f} |"
        )
    print()
    for shape in sorted({s for s, _ in by}):
        q, u, h = (by.get((shape, k)) for k in ("qlora", "unsloth", "hf"))
        if not (q and u and h):
            continue
        print(f"{shape}:")
        print(f"  qlora/unsloth steady      {q['steady_tokens_per_s'] / u['steady_tokens_per_s']:.3f}")
        print(f"  qlora/unsloth whole train {q['tokens_per_s'] / u['tokens_per_s']:.3f}")
        print(f"  qlora/hf steady           {q['steady_tokens_per_s'] / h['steady_tokens_per_s']:.3f}")
        print(f"  unsloth/hf steady         {u['steady_tokens_per_s'] / h['steady_tokens_per_s']:.3f}")
        qpeak = q["qlora_gpu_memory_peak_reserved_bytes"]
        print(f"  qlora/hf peak VRAM (whole run, verification included) "
              f"{qpeak / h['max_memory_reserved_bytes']:.3f}")
        print(f"  unsloth/hf peak VRAM (training)                       "
              f"{u['max_memory_reserved_bytes'] / h['max_memory_reserved_bytes']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
