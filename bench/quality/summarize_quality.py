"""Summarize ``results.jsonl`` of ``bench/quality/quality.py drive``: Markdown tables and a PNG.

    python3 bench/quality/summarize_quality.py RESULTS.jsonl [MORE.jsonl ...] [--plot OUT.png] [--json OUT.json]

Several results files (runs of the same grid that add seeds, e.g. ``--jobs``) are merged; the
same task, configuration and seed twice is refused rather than silently picking one.

* **runs**: per task and configuration, over its seeds: the adapter's held-out accuracy
  (mean over seeds; each seed's Wilson 95 % interval), the adapter's held-out loss per answer
  token, the base model's accuracy and loss *in that run's precision*, gate verdicts;
* **comparisons**, paired by seed (same seed, same data order): accuracy and loss difference,
  mean over seeds with a 95 % t-interval across seeds (needs 2 seeds or more; with one seed
  the interval is the two runs' binomial one, which ignores seed-to-seed variance);
  "outside noise" means the interval excludes 0;
* **perplexity**: the base model on every token of the held-out rows, per quantization;
* **recovered**: for dynamic 4-bit at each budget, the fraction of nf4's loss (relative to
  16 bit) won back, ``(x_nf4 - x_dyn) / (x_nf4 - x_16bit)``, for the base's whole-text loss
  and for the adapters' held-out loss and accuracy (means over seeds).

The plot (matplotlib) shows accuracy and recovered error against the MiB kept in 16 bit.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

DYN = "qlora-dyn4-"
LINEAR_PARAMS = 106_168_320
"""SmolLM2-135M's decoder linear weights (30 layers x 3,538,944): what 16 bit keeps."""
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 * (1 / 4 + 1 / 256 * 4)  # codes + double-quant absmax
FULL_16BIT_MIB = LINEAR_PARAMS * (2 - NF4_BYTES_PER_PARAM) / 2**20
# t quantiles (0.975) for n-1 degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def load(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        sys.exit(f"{path}: cannot read: {e.strerror or e}")
    rows = []
    for n, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError as e:
            sys.exit(f"{path}: line {n}: not JSON: {e}")
        row.setdefault("kind", "run")
        row.setdefault("task", "quartz")
        rows.append(row)
    return rows


def _runs(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, dict[str, Any]]]:
    by: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        if r["kind"] == "run" and "evaluation" in r:
            by[(r["task"], r["config"])][r["seed"]] = r["evaluation"]
    return by


def _mean_ci(xs: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95 % t-interval (None with one value)."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, None
    return m, T975.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _config_order(name: str) -> tuple[int, float]:
    fixed = ["lora-16bit", "qlora-nf4", "qlora-nf4-whole-seq", "qlora-nf4-attn-only"]
    if name in fixed:
        return fixed.index(name), 0.0
    return len(fixed), float(name.removeprefix(DYN)) if name.startswith(DYN) else 1e9


def runs_table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| task | config | seeds | adapter acc, mean (95% CI over seeds) | per-seed acc "
        "[Wilson 95%] | adapter loss | base acc | base loss | gate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by = _runs(rows)
    for task, name in sorted(by, key=lambda k: (k[0] != "quartz", k[0], _config_order(k[1]))):
        ev = [by[(task, name)][s] for s in sorted(by[(task, name)])]
        m, h = _mean_ci([e["adapter"]["accuracy"] for e in ev])
        seeds = "; ".join(
            f"{_pct(e['adapter']['accuracy'])} [{100 * e['adapter']['accuracy_low']:.1f}-"
            f"{100 * e['adapter']['accuracy_high']:.1f}]"
            for e in ev
        )
        lm, lh = _mean_ci([e["adapter"]["loss"] for e in ev])
        out.append(
            f"| {task} | {name} | {len(ev)} | {_pct(m)}"
            f"{f' (±{100 * h:.1f})' if h is not None else ''} | {seeds} | {lm:.3f}"
            f"{f' ±{lh:.3f}' if lh is not None else ''} | {_pct(ev[0]['base']['accuracy'])} | "
            f"{ev[0]['base']['loss']:.3f} | "
            f"{sum(e['gate']['passed'] for e in ev)}/{len(ev)} pass |"
        )
    return "\n".join(out)


COMPARISONS = [
    ("qlora-nf4", "lora-16bit", "nf4 minus 16-bit LoRA"),
    ("qlora-nf4", "qlora-nf4-whole-seq", "completion-only minus whole-sequence loss"),
    ("qlora-nf4", "qlora-nf4-attn-only", "all seven projections minus attention only"),
]


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = _runs(rows)
    pairs = list(COMPARISONS)
    dyn = sorted({n for _, n in by if n.startswith(DYN)}, key=_config_order)
    pairs += [(n, "qlora-nf4", f"dynamic 4-bit ({n.removeprefix(DYN)} MiB) minus nf4") for n in dyn]
    out = []
    for task in sorted({t for t, _ in by}, key=lambda t: (t != "quartz", t)):
        for a, b, label in pairs:
            ra, rb = by.get((task, a), {}), by.get((task, b), {})
            seeds = sorted(set(ra) & set(rb))
            if not seeds:
                continue
            d_acc = [ra[s]["adapter"]["accuracy"] - rb[s]["adapter"]["accuracy"] for s in seeds]
            d_loss = [ra[s]["adapter"]["loss"] - rb[s]["adapter"]["loss"] for s in seeds]
            m, h = _mean_ci(d_acc)
            basis = "t over seeds"
            if h is None:  # one seed: two independent binomials, seed variance not included
                s = seeds[0]
                pa, pb = ra[s]["adapter"]["accuracy"], rb[s]["adapter"]["accuracy"]
                n = ra[s]["adapter"]["scored_rows"]
                h = 1.96 * math.sqrt(pa * (1 - pa) / n + pb * (1 - pb) / n)
                basis = "binomial, 1 seed"
            lm, lh = _mean_ci(d_loss)
            out.append(
                {
                    "task": task,
                    "a": a,
                    "b": b,
                    "label": label,
                    "seeds": seeds,
                    "acc_diff": m,
                    "acc_half_width": h,
                    "acc_basis": basis,
                    "acc_outside_noise": abs(m) > h,
                    "loss_diff": lm,
                    "loss_half_width": lh,
                    "loss_outside_noise": lh is not None and abs(lm) > lh,
                    "per_seed_acc_diff": d_acc,
                }
            )
    return out


def comparisons_table(comps: list[dict[str, Any]]) -> str:
    out = [
        "| task | difference | seeds | accuracy, points (95% CI) | outside noise? | "
        "adapter loss (95% CI) | outside noise? |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comps:
        lh = c["loss_half_width"]
        out.append(
            f"| {c['task']} | {c['label']} | {len(c['seeds'])} | "
            f"{100 * c['acc_diff']:+.1f} (±{100 * c['acc_half_width']:.1f}, {c['acc_basis']}) | "
            f"{'**yes**' if c['acc_outside_noise'] else 'no'} | {c['loss_diff']:+.3f}"
            f"{f' (±{lh:.3f})' if lh is not None else ''} | "
            f"{'**yes**' if c['loss_outside_noise'] else ('no' if lh is not None else 'n/a')} |"
        )
    return "\n".join(out)


def _ppl(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Base whole-text loss per (task, mode); dynamic 4-bit's from its runs (mean over seeds:
    each seed's calibration rows give it its own skip list)."""
    out = {(r["task"], r["mode"]): r for r in rows if r["kind"] == "ppl" and "perplexity" in r}
    dyn: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["kind"] == "run" and "perplexity" in r.get("base_text", {}):
            d = r.get("dynamic_4bit", {})
            dyn[(r["task"], f"dynamic-4bit:{r['config'].removeprefix(DYN)}")].append(
                {**r["base_text"], "kept": len(d.get("kept", [])), "spent": d.get("spent_bytes")}
            )
    for key, group in dyn.items():
        loss = statistics.fmean(g["loss"] for g in group)
        out[key] = {
            **group[0],
            "loss": loss,
            "perplexity": math.exp(loss),
            "seeds": len(group),
            "kept": "/".join(str(g["kept"]) for g in group),
            "spent_mib": "/".join(f"{(g['spent'] or 0) / 2**20:.1f}" for g in group),
        }
    return out


def _mode_budget(mode: str) -> float | None:
    if mode == "4bit":
        return 0.0
    if mode == "16bit":
        return None
    return float(mode.partition(":")[2])


def ppl_table(rows: list[dict[str, Any]]) -> str:
    ppl = _ppl(rows)
    out = [
        "| task | base model in | held-out rows | tokens | loss/token | perplexity | "
        "modules kept in 16 bit (MiB spent), per seed |",
        "|---|---|---|---|---|---|---|",
    ]

    def order(kv: Any) -> tuple[str, float]:
        b = _mode_budget(kv[0][1])
        return kv[0][0], 1e9 if b is None else b

    for (task, mode), r in sorted(ppl.items(), key=order):
        kept = f"{r['kept']} ({r['spent_mib']})" if "kept" in r else ""
        out.append(
            f"| {task} | {mode} | {r['rows']} | {r['tokens']} | {r['loss']:.4f} | "
            f"{r['perplexity']:.2f} | {kept} |"
        )
    return "\n".join(out)


def _row_ci(
    r4: list[float], rd: list[float], r16: list[float]
) -> tuple[float, float, float] | None:
    """The recovered share with every held-out row weighted equally (per-row mean losses of the
    same rows in the three precisions), and its 95 % bootstrap interval (rows resampled, 2,000
    times): ``(share, low, high)``. The token-weighted share beside it in the table has no
    interval, because the rows' token counts are not recorded; the two differ where long rows
    gain more or less than short ones."""
    if not (len(r4) == len(rd) == len(r16)) or not r4:
        return None
    point = _recover(sum(r4), sum(rd), sum(r16))
    if point is None:
        return None
    import random

    rng = random.Random(0)
    n, shares = len(r4), []
    for _ in range(2000):
        idx = [rng.randrange(n) for _ in range(n)]
        gap = sum(r4[i] - r16[i] for i in idx)
        if gap != 0:
            shares.append(sum(r4[i] - rd[i] for i in idx) / gap)
    shares.sort()
    return point, shares[int(0.025 * len(shares))], shares[int(0.975 * len(shares)) - 1]


def _recover(x4: float, xd: float, x16: float) -> float | None:
    return None if x4 == x16 else (x4 - xd) / (x4 - x16)


def recovered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fraction of nf4's gap to 16 bit won back by dynamic 4-bit, per task and budget."""
    by, ppl, out, comps = _runs(rows), _ppl(rows), [], comparisons(rows)
    for task in sorted({t for t, _ in by} | {t for t, _ in ppl}):
        budgets = sorted(
            {float(n.removeprefix(DYN)) for t, n in by if t == task and n.startswith(DYN)}
            | {b for t, m in ppl if t == task and (b := _mode_budget(m))}
        )
        for b in budgets:
            name = f"{DYN}{b:g}"
            row: dict[str, Any] = {"task": task, "budget_mib": b}
            p4, p16 = ppl.get((task, "4bit")), ppl.get((task, "16bit"))
            pd = ppl.get((task, f"dynamic-4bit:{b:g}"))
            if p4 and p16 and pd:
                row["base_text_loss"] = _recover(p4["loss"], pd["loss"], p16["loss"])
                row["base_text_loss_ci"] = _row_ci(
                    p4.get("row_loss", []), pd.get("row_loss", []), p16.get("row_loss", [])
                )
            r4, r16, rd = (
                by.get((task, "qlora-nf4")),
                by.get((task, "lora-16bit")),
                by.get((task, name)),
            )
            gap = next(
                (
                    c
                    for c in comps
                    if c["task"] == task and c["a"] == "qlora-nf4" and c["b"] == "lora-16bit"
                ),
                None,
            )
            if r4 and r16 and rd:

                def mean(runs: dict[int, Any], side: str, key: str) -> float:
                    return statistics.fmean(e[side][key] for e in runs.values())

                row["base_answer_loss"] = _recover(
                    mean(r4, "base", "loss"), mean(rd, "base", "loss"), mean(r16, "base", "loss")
                )
                # the adapters' shares only where nf4 is worse than 16 bit beyond noise
                row["adapter_loss_gap"] = mean(r4, "adapter", "loss") - mean(r16, "adapter", "loss")
                if gap is not None and gap["loss_outside_noise"] and gap["loss_diff"] > 0:
                    row["adapter_loss"] = _recover(
                        mean(r4, "adapter", "loss"),
                        mean(rd, "adapter", "loss"),
                        mean(r16, "adapter", "loss"),
                    )
                # accuracy: higher is better, so the gap is 16-bit minus nf4
                a4, ad, a16 = (
                    mean(r4, "adapter", "accuracy"),
                    mean(rd, "adapter", "accuracy"),
                    mean(r16, "adapter", "accuracy"),
                )
                if gap is not None and gap["acc_outside_noise"] and gap["acc_diff"] < 0:
                    row["adapter_accuracy"] = (ad - a4) / (a16 - a4)
                row["accuracy_gap_points"] = 100 * (a16 - a4)
            out.append(row)
    return out


def recovered_table(rec: list[dict[str, Any]]) -> str:
    out = [
        "| task | 16-bit budget (MiB) | base whole-text loss: per token; per row (95% CI, "
        "rows bootstrapped) | "
        "base answer loss | adapter loss (gap nf4 minus 16-bit) | "
        "adapter accuracy (gap 16-bit minus nf4, points) |",
        "|---|---|---|---|---|---|",
    ]

    def f(x: Any, why: str = "n/a") -> str:
        return why if x is None else f"{100 * x:.0f}%"

    for r in rec:
        gap, lgap, ci = (
            r.get("accuracy_gap_points"),
            r.get("adapter_loss_gap"),
            r.get("base_text_loss_ci"),
        )
        nogap = "n/a: no gap beyond noise"
        out.append(
            f"| {r['task']} | {r['budget_mib']:g} | {f(r.get('base_text_loss'))}"
            f"{f'; {100 * ci[0]:.0f}% ({100 * ci[1]:.0f} to {100 * ci[2]:.0f}%)' if ci else ''} | "
            f"{f(r.get('base_answer_loss'))} | {f(r.get('adapter_loss'), nogap)}"
            f"{f' ({lgap:+.4f})' if lgap is not None else ''} | "
            f"{f(r.get('adapter_accuracy'), nogap)}{f' ({gap:+.1f})' if gap is not None else ''} |"
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], dest: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by, ppl = _runs(rows), _ppl(rows)
    tasks = sorted({t for t, _ in by}, key=lambda t: (t != "quartz", t))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    full = FULL_16BIT_MIB
    for i, task in enumerate(tasks):
        pts = []
        for name in by:
            if name[0] != task:
                continue
            cfg = name[1]
            x = (
                0.0
                if cfg == "qlora-nf4"
                else full
                if cfg == "lora-16bit"
                else float(cfg.removeprefix(DYN))
                if cfg.startswith(DYN)
                else None
            )
            if x is None:
                continue
            accs = [e["adapter"]["accuracy"] for e in by[name].values()]
            n = sum(e["adapter"]["scored_rows"] for e in by[name].values())
            m, half = _mean_ci(accs)
            if half is None:  # one seed: the binomial interval of its rows
                half = 1.96 * math.sqrt(m * (1 - m) / n)
            pts.append((x, m, half, accs))
        pts.sort()
        if pts:
            ax.errorbar(
                [p[0] for p in pts],
                [100 * p[1] for p in pts],
                yerr=[100 * p[2] for p in pts],
                fmt="o-",
                color=f"C{i}",
                capsize=3,
                label=f"{task}: adapter (mean; dots: seeds; bars: 95% t over seeds)",
            )
            for p in pts:
                ax.scatter(
                    [p[0]] * len(p[3]), [100 * a for a in p[3]], color=f"C{i}", s=8, alpha=0.4
                )
        base = by.get((task, "qlora-nf4")) or by.get((task, "lora-16bit"))
        if base:
            b = next(iter(base.values()))["base"]["accuracy"]
            ax.axhline(100 * b, color=f"C{i}", ls="--", lw=1, label=f"{task}: base zero-shot (nf4)")
        for other, marker in (("qlora-nf4-whole-seq", "s"), ("qlora-nf4-attn-only", "^")):
            runs = by.get((task, other))
            if runs:
                m, _ = _mean_ci([e["adapter"]["accuracy"] for e in runs.values()])
                ax.scatter(
                    [-0.04 * full],
                    [100 * m],
                    marker=marker,
                    color=f"C{i}",
                    s=40,
                    label=f"{task}: {other} (nf4)",
                )
    ax.axhline(50, color="grey", ls=":", lw=1)
    ax.set_xlabel("MiB of linear weights kept in 16 bit (0 = nf4, right end = 16-bit LoRA)")
    ax.set_ylabel("held-out accuracy, %")
    ax.set_title("SmolLM2-135M-Instruct: held-out accuracy vs 16-bit budget")
    ax.legend(fontsize=6, loc="center right")
    for task in sorted({t for t, _ in ppl}):
        i = tasks.index(task) if task in tasks else len(tasks)
        p4, p16 = ppl.get((task, "4bit")), ppl.get((task, "16bit"))
        pts = []
        for (t, mode), r in ppl.items():
            b = _mode_budget(mode)
            if t == task and p4 and p16 and b is not None:
                pts.append((b, _recover(p4["loss"], r["loss"], p16["loss"])))
        if p16 and p4:
            pts.append((full, 1.0))
        pts = sorted(p for p in pts if p[1] is not None)
        if pts:
            bx.plot(
                [p[0] for p in pts],
                [100 * p[1] for p in pts],
                "o-",
                color=f"C{i}",
                label=f"{task}: base whole-text loss",
            )
    for r in recovered(rows):
        if r.get("adapter_loss") is not None:
            bx.scatter([r["budget_mib"]], [100 * r["adapter_loss"]], marker="x", color="k", s=30)
    bx.axhline(70, color="C3", ls=":", lw=1, label="the seed's claim: ~70%")
    bx.set_xlabel("MiB of linear weights kept in 16 bit")
    bx.set_ylabel("share of nf4's loss gap to 16 bit recovered, %")
    bx.set_title("dynamic 4-bit: recovered error (x: adapters' held-out loss)")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    return True


def load_all(paths: list[Path]) -> list[dict[str, Any]]:
    """Rows of every file; a run (task, config, seed) or a ppl row (task, mode) that appears in
    two files exits with both names."""
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], Path] = {}
    for path in paths:
        for row in load(path):
            if row["kind"] == "run":
                key: tuple[Any, ...] = ("run", row["task"], row.get("config"), row.get("seed"))
            elif row["kind"] == "ppl":
                key = ("ppl", row["task"], row.get("mode"))
            else:
                key = ("other", len(rows))
            if key in seen:
                sys.exit(f"{path}: {' '.join(map(str, key))} is also in {seen[key]}")
            seen[key] = path
            rows.append(row)
    return rows


def summarize(paths: list[Path], plot_to: Path | None = None, json_to: Path | None = None) -> int:
    rows = load_all(paths)
    if not any(r["kind"] == "run" and "evaluation" in r for r in rows):
        print(f"{' '.join(map(str, paths))}: no evaluated runs", file=sys.stderr)
        return 2
    comps, rec = comparisons(rows), recovered(rows)
    print("### Runs\n\n" + runs_table(rows))
    print("\n### Differences (paired by seed)\n\n" + comparisons_table(comps))
    if _ppl(rows):
        print("\n### Base perplexity under each quantization\n\n" + ppl_table(rows))
    if rec:
        print("\n### Dynamic 4-bit: share of nf4's gap recovered\n\n" + recovered_table(rec))
    failed = [r for r in rows if "crash" in r or (r["kind"] == "run" and "evaluation" not in r)]
    for r in failed:
        print(
            f"\nnot evaluated: {r.get('task')} {r.get('config') or r.get('mode')} seed "
            f"{r.get('seed')}: {r.get('crash') or r.get('error')}"
        )
    if json_to is not None:
        json_to.write_text(json.dumps({"comparisons": comps, "recovered": rec}, indent=1) + "\n")
    if plot_to is not None and plot(rows, plot_to):
        print(f"\nplot: {plot_to}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("results", type=Path, nargs="+")
    p.add_argument("--plot", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    return summarize(args.results, args.plot, args.json)


if __name__ == "__main__":
    sys.exit(main())
