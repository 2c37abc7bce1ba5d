"""Print the speed tables and the target ratios from the committed ``bench/speed/run*/`` data.

The README's benchmark numbers are this script's output on the committed data, so they can be
re-derived without a GPU::

    python3 bench/summarize.py                      # every bench/speed/run*/results.jsonl
    python3 bench/summarize.py bench/speed/run3-8b  # one run

Two steady-state rates are printed per row:

* ``window``: tokens between the end of step ``warm`` and the last step over the wall time in
  between (what ``speed.py`` records as ``steady_tokens_per_s``);
* ``median step``: tokens per optimizer step over the median step time after ``warm``, which a
  single slow step (a host hiccup, a garbage collection) does not move. It needs per-step times,
  which the runs from ``run3`` on record for every runner.

Ratios between runners of one shape use the median over repetitions (``order`` says in which
order the runners ran). A ``qlora`` row that trained nothing (a rerun that resumed from a final
checkpoint: no steady rate) is listed but left out of the ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

GIB = 2**30
HERE = Path(__file__).resolve().parent


def median_step_rate(r: dict[str, Any], warm: int = 5) -> float | None:
    """Tokens/s from the median optimizer-step time after the first ``warm`` steps."""
    times = r.get("step_times_s") or []
    after = times[warm - 1 :] if len(times) > warm else []
    if not after:
        return None
    micro = r.get("micro_batch_size") or r.get("micro_batch") or 0
    accum = r.get("gradient_accumulation_steps") or r.get("accumulation") or 1
    return float(micro * accum * r["seq"]) / statistics.median(after)


def median(rows: list[dict[str, Any]], key: str = "", warm: int = 5) -> float | None:
    """Median over repetitions of the field ``key``, or of the median-step rate without one."""
    vals = [v for v in (r.get(key) if key else median_step_rate(r, warm) for r in rows) if v]
    return statistics.median(vals) if vals else None


def peak(r: dict[str, Any]) -> float:
    """Peak reserved bytes: the bare script's own, or the run's gauge for ``qlora run``."""
    return float(
        r.get("max_memory_reserved_bytes") or r.get("qlora_gpu_memory_peak_reserved_bytes") or 0
    )


def label(r: dict[str, Any]) -> str:
    return r["runner"] + (f" ({r['variant']})" if r.get("variant") else "")


def table(rows: list[dict[str, Any]], warm: int) -> None:
    print(
        "| shape | runner | order | steady tokens/s (window) | steady tokens/s (median step) "
        "| whole train tokens/s | MFU (window) | peak reserved GiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        steady = r.get("steady_tokens_per_s")
        med = median_step_rate(r, warm)
        whole = r.get("tokens_per_s") if steady else None
        print(
            f"| {r['shape']} | {label(r)} | {r.get('order', '')} | "
            + (f"{steady:,.0f}" if steady else "trained nothing")
            + " | "
            + (f"{med:,.0f}" if med else "")
            + " | "
            + (f"{whole:,.0f}" if whole else "")
            + " | "
            + (f"{100 * r['steady_mfu']:.1f}%" if r.get("steady_mfu") else "")
            + f" | {peak(r) / GIB:.2f} |"
        )


def ratios(rows: list[dict[str, Any]], warm: int) -> None:
    plain = [r for r in rows if not r.get("variant") and r.get("steady_tokens_per_s")]
    for shape in sorted({r["shape"] for r in plain}):
        by: dict[str, list[dict[str, Any]]] = {}
        for r in plain:
            if r["shape"] == shape:
                by.setdefault(r["runner"], []).append(r)

        print(f"{shape} (repetitions: " + ", ".join(f"{k} {len(v)}" for k, v in by.items()) + ")")
        for a, b in (("qlora", "unsloth"), ("qlora", "hf"), ("unsloth", "hf")):
            ra, rb = by.get(a, []), by.get(b, [])
            wa, wb = median(ra, "steady_tokens_per_s"), median(rb, "steady_tokens_per_s")
            sa, sb = median(ra, warm=warm), median(rb, warm=warm)
            ta, tb = median(ra, "tokens_per_s"), median(rb, "tokens_per_s")
            if not (wa and wb):
                continue
            print(
                f"  {a}/{b}: steady {wa / wb:.3f} (window)"
                + (f", {sa / sb:.3f} (median step)" if sa and sb else "")
                + (f", whole train {ta / tb:.3f}" if ta and tb else "")
            )
        hf = [peak(r) for r in by.get("hf", [])]
        for runner in ("qlora", "unsloth"):
            mine = [peak(r) for r in by.get(runner, [])]
            if mine and hf:
                print(f"  {runner}/hf peak reserved VRAM {max(mine) / max(hf):.3f}")
    seed = [r for r in rows if r.get("variant") == "seed-2x8"]
    auto = [r for r in rows if r.get("variant") == "planner-auto"]
    if seed and auto:
        s, a = seed[0], auto[0]
        print(
            f"planner ({a['shape']}, {a.get('gpu_class')} class): micro batch "
            f"{a.get('micro_batch_size')} x {a.get('gradient_accumulation_steps')} vs seed "
            f"{s.get('micro_batch_size')} x {s.get('gradient_accumulation_steps')}: steady "
            f"{a['steady_tokens_per_s'] / s['steady_tokens_per_s']:.3f}x, MFU "
            f"{100 * a['steady_mfu']:.1f}% vs {100 * s['steady_mfu']:.1f}%; "
            f"peak reserved {peak(a) / GIB:.2f} GiB against an estimate of "
            f"{(a.get('plan_vram_estimate_bytes') or 0) / GIB:.2f} GiB (context included)"
        )


def main(argv: list[str]) -> int:
    dirs = [Path(a) for a in argv] or sorted((HERE / "speed").glob("run*"))
    for d in dirs:
        path = d / "results.jsonl" if d.is_dir() else d
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            print(f"{path}: cannot read the results: {e}", file=sys.stderr)
            return 2
        env_path = path.parent / "env.json"
        env = json.loads(env_path.read_text()) if env_path.exists() else {}
        warm = 5
        print(f"## {path.parent.name}: {env.get('card', '?')}, {env.get('command', '')}")
        print()
        table(rows, warm)
        print()
        ratios(rows, warm)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
