"""Plot tokens/s (median step) and peak reserved memory per runner from speed/run5-data.

Usage: ``python3 bench/plot_speed_data.py`` (needs matplotlib) -> ``speed/run5-data/speed.png``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN = HERE / "speed" / "run5-data"


def rows() -> list[dict]:
    out = []
    for line in (RUN / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "runner" not in r or not r.get("step_times_s"):
            continue
        med = statistics.median(r["step_times_s"])
        tps = r["train_tokens"] / r["steps"] / med
        peak = r.get("qlora_gpu_memory_peak_reserved_bytes") or r.get("max_memory_reserved_bytes")
        out.append({"runner": r["runner"], "tokens_per_s": tps, "peak_gib": peak / 1024**3})
    return out


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows()
    names = [d["runner"] for d in data]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.bar(names, [d["tokens_per_s"] for d in data], color=["#888", "#2a7", "#c64"])
    a.set_ylabel("tokens/s (median step)")
    a.set_title("Llama-3.1-8B shape, realistic rows, H200")
    b.bar(names, [d["peak_gib"] for d in data], color=["#888", "#2a7", "#c64"])
    b.set_ylabel("peak reserved GiB")
    b.set_title("24GB-class plan uses its room")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=15)
    fig.tight_layout()
    fig.savefig(RUN / "speed.png", dpi=110)


if __name__ == "__main__":
    main()
