"""Summarize ``results.jsonl`` of ``bench/quality/quality.py drive``: a Markdown table and a PNG.

    python3 bench/quality/summarize_quality.py RESULTS.jsonl [--plot OUT.png]

Per configuration (over its seeds): held-out accuracy of the adapter (mean over seeds, and each
seed's Wilson 95 % interval), the base model's accuracy and loss in that run's precision, the
adapter's held-out loss, and the paired loss gain with its 95 % bound. The plot (matplotlib,
only when installed) shows accuracy with intervals per configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        sys.exit(f"{path}: cannot read: {e.strerror or e}")
    rows = []
    for n, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            sys.exit(f"{path}: line {n}: not JSON: {e}")
    return [r for r in rows if "evaluation" in r]


def table(rows: list[dict[str, Any]]) -> str:
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[r["config"]].append(r)
    out = [
        "| config | seeds | base acc | adapter acc (mean) | adapter acc 95% CI per seed | "
        "base loss | adapter loss | loss gain (95% bound) | gate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in by.items():
        ev = [r["evaluation"] for r in runs]
        acc = [e["adapter"]["accuracy"] for e in ev]
        cis = ", ".join(
            f"{100 * e['adapter']['accuracy_low']:.1f}-{100 * e['adapter']['accuracy_high']:.1f}"
            for e in ev
        )
        gains = ", ".join(
            f"{e['loss_gain']['mean']:+.3f} ({e['loss_gain']['low']:+.3f})" for e in ev
        )
        out.append(
            f"| {name} | {len(runs)} | {100 * ev[0]['base']['accuracy']:.1f}% | "
            f"{100 * statistics.fmean(acc):.1f}% | {cis} | {ev[0]['base']['loss']:.3f} | "
            f"{statistics.fmean(e['adapter']['loss'] for e in ev):.3f} | {gains} | "
            f"{'/'.join('pass' if e['gate']['passed'] else 'fail' for e in ev)} |"
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], dest: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    names = sorted({r["config"] for r in rows})
    for i, name in enumerate(names):
        runs = [r for r in rows if r["config"] == name]
        for j, r in enumerate(runs):
            a = r["evaluation"]["adapter"]
            x = i + 0.12 * (j - (len(runs) - 1) / 2)
            ax.errorbar(
                x,
                100 * a["accuracy"],
                yerr=[
                    [100 * (a["accuracy"] - a["accuracy_low"])],
                    [100 * (a["accuracy_high"] - a["accuracy"])],
                ],
                fmt="o",
                color="C0",
                capsize=3,
            )
        b = runs[0]["evaluation"]["base"]
        ax.plot([i - 0.3, i + 0.3], [100 * b["accuracy"]] * 2, color="C3", lw=2)
    ax.axhline(50, color="grey", ls=":", lw=1)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("held-out accuracy, % (95% Wilson CI)")
    ax.set_title("SmolLM2-135M-Instruct on QuaRTz: adapter (dots) vs base in that precision (bar)")
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    return True


def summarize(results: Path, plot_to: Path | None = None) -> int:
    rows = load(results)
    if not rows:
        print(f"{results}: no evaluated runs", file=sys.stderr)
        return 2
    print(table(rows))
    if plot_to is not None and plot(rows, plot_to):
        print(f"\nplot: {plot_to}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("results", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args()
    return summarize(args.results, args.plot)


if __name__ == "__main__":
    sys.exit(main())
