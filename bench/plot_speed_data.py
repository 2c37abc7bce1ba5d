"""Plot tokens/s and peak reserved memory per runner of a realistic-data run (no dependencies).

Usage: ``python3 bench/plot_speed_data.py [RUN]`` (default ``run7-data``) writes
``speed/RUN/speed.svg`` from ``results-printed.jsonl`` (run7), ``speed-results.jsonl`` (run8;
run10 adds ``speed-hf-results.jsonl``, its second call) or ``results.jsonl``: steady
tokens/s (the run's own window, steps ``warm``..last) and peak reserved GiB per runner.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rows(run: Path) -> list[dict]:
    for name in ("results-printed.jsonl", "speed-results.jsonl", "results.jsonl"):
        src = run / name  # run7 printed its records; run8 named them after its call
        if src.is_file():
            break
    out: list[dict] = []
    # run10: a second call (speed-hf-results.jsonl) ran the runners the first one's budget
    # missed; they are added, marked, and never replace a runner of the first call
    for source, mark in ((src, ""), (run / "speed-hf-results.jsonl", " [2nd call]")):
        if not source.is_file():
            continue
        seen = {d["name"] for d in out}
        for line in source.read_text().splitlines():
            r = json.loads(line)
            if "runner" not in r or not r.get("steady_tokens_per_s") or r["runner"] in seen:
                continue
            peak = (r.get("qlora_gpu_memory_peak_reserved_bytes")
                    or r.get("max_memory_reserved_bytes"))
            label = r["runner"] + (f" ({r['cache']} cache)" if r.get("cache") else "") + mark
            out.append({"name": r["runner"], "runner": label,
                        "tokens_per_s": r["steady_tokens_per_s"],
                        "peak_gib": peak / 1024**3, "shape": r["shape"]})
    return out


def bars(data: list[dict], key: str, title: str, unit: str, x0: int) -> list[str]:
    top = max(d[key] for d in data) * 1.15
    h, w, y0 = 260, 420, 40
    out = [f'<text x="{x0 + w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    bw = w / len(data)
    for i, d in enumerate(data):
        bh = h * d[key] / top
        x = x0 + i * bw + 6
        color = "#2a7" if d["runner"].startswith("qlora") else "#888"
        out.append(f'<rect x="{x:.0f}" y="{y0 + h - bh:.0f}" width="{bw - 12:.0f}" '
                   f'height="{bh:.0f}" fill="{color}"/>')
        out.append(f'<text x="{x + (bw - 12) / 2:.0f}" y="{y0 + h - bh - 4:.0f}" '
                   f'text-anchor="middle" font-size="11">{d[key]:,.0f}{unit}</text>')
        out.append(f'<text x="{x + (bw - 12) / 2:.0f}" y="{y0 + h + 14}" text-anchor="end" '
                   f'font-size="10" transform="rotate(-30 {x + (bw - 12) / 2:.0f} '
                   f'{y0 + h + 14})">{d["runner"]}</text>')
    return out


def main(argv: list[str]) -> None:
    run = HERE / "speed" / (argv[0] if argv else "run7-data")
    data = rows(run)
    parts = bars(data, "tokens_per_s", "steady tokens/s (H200, realistic rows)", "", 10)
    parts += bars(data, "peak_gib", "peak reserved (GiB)", "", 470)
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="900" height="420" '
           'font-family="sans-serif"><rect width="900" height="420" fill="white"/>'
           + "".join(parts) + "</svg>\n")
    (run / "speed.svg").write_text(svg)


if __name__ == "__main__":
    main(sys.argv[1:])
