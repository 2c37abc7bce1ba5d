"""The quality bench's arithmetic (``bench/quality/summarize_quality.py``) and grid order
(``bench/quality/quality.py``), on hand-made rows: no model, no GPU."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality"


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


summ = _module("summarize_quality")
quality = _module("quality")


def _run(task: str, config: str, seed: int, acc: float, loss: float, base_loss: float) -> Any:
    side = {"accuracy": acc, "loss": loss, "scored_rows": 900, "accuracy_low": acc - 0.03}
    side["accuracy_high"] = acc + 0.03
    base = {"accuracy": 0.5, "loss": base_loss, "scored_rows": 900}
    gate = {"passed": acc > 0.55}
    return {
        "kind": "run",
        "task": task,
        "config": config,
        "seed": seed,
        "evaluation": {"adapter": side, "base": base, "gate": gate},
    }


def test_recovered_share_of_the_base_loss_gap() -> None:
    rows = [
        {"kind": "ppl", "task": "t", "mode": "16bit", "loss": 2.0, "perplexity": 7.39},
        {"kind": "ppl", "task": "t", "mode": "4bit", "loss": 3.0, "perplexity": 20.1},
        {
            **_run("t", "qlora-dyn4-15", 1, 0.6, 0.2, 2.5),
            "base_text": {"loss": 2.3, "perplexity": 9.97, "rows": 2, "tokens": 10},
        },
        _run("t", "qlora-nf4", 1, 0.6, 0.2, 3.0),
        _run("t", "lora-16bit", 1, 0.6, 0.2, 2.0),
    ]
    (rec,) = summ.recovered(rows)
    assert rec["budget_mib"] == 15
    assert rec["base_text_loss"] == pytest.approx(0.7)  # (3.0 - 2.3) / (3.0 - 2.0)
    assert rec["base_answer_loss"] == pytest.approx(0.5)  # (3.0 - 2.5) / (3.0 - 2.0)
    # nf4 and 16-bit adapters equal: no gap to recover, so no share is claimed
    assert "adapter_accuracy" not in rec and "adapter_loss" not in rec


def test_paired_differences_and_noise() -> None:
    rows = [
        _run("t", "qlora-nf4", 1, 0.70, 0.2, 3.0),
        _run("t", "qlora-nf4", 2, 0.72, 0.2, 3.0),
        _run("t", "qlora-nf4-whole-seq", 1, 0.55, 0.3, 3.0),
        _run("t", "qlora-nf4-whole-seq", 2, 0.56, 0.3, 3.0),
        _run("t", "lora-16bit", 1, 0.69, 0.2, 2.0),
    ]
    comps = {c["label"]: c for c in summ.comparisons(rows)}
    whole = comps["completion-only minus whole-sequence loss"]
    assert whole["seeds"] == [1, 2] and whole["acc_basis"] == "t over seeds"
    assert whole["acc_diff"] == pytest.approx(0.155)
    # per-seed differences 0.15 and 0.16: sd 0.00707, t(1) 12.706 / sqrt 2 -> 0.0635
    assert whole["acc_half_width"] == pytest.approx(12.706 * 0.0070711 / 2**0.5, rel=1e-3)
    assert whole["acc_outside_noise"]
    sixteen = comps["nf4 minus 16-bit LoRA"]  # one shared seed: two binomials
    assert sixteen["acc_basis"] == "binomial, 1 seed"
    assert sixteen["acc_diff"] == pytest.approx(0.01) and not sixteen["acc_outside_noise"]


def test_grid_runs_every_configuration_of_a_seed_before_the_next(tmp_path: Path) -> None:
    args = argparse.Namespace(
        configs=["lora-16bit", "qlora-nf4"],
        dyn_budgets=[],
        tasks=["quartz", "logic"],
        seeds=[1, 2],
        main_only=[],
        ppl=True,
        jobs=[],
    )
    jobs = quality.jobs_for(args)
    assert jobs[:4] == [
        ("ppl", "quartz", "16bit", 0),
        ("ppl", "quartz", "4bit", 0),
        ("ppl", "logic", "16bit", 0),
        ("ppl", "logic", "4bit", 0),
    ]
    assert [j[3] for j in jobs[4:]] == [1, 1, 1, 1, 2, 2, 2, 2]
    args.jobs = ["logic:qlora-nf4:3", "quartz:qlora-dyn4-15:2"]  # exactly these, in order
    assert quality.jobs_for(args) == [
        ("run", "logic", "qlora-nf4", 3),
        ("run", "quartz", "qlora-dyn4-15", 2),
    ]
    args.jobs = ["logic:no-such-config:1"]
    with pytest.raises(SystemExit, match="unknown configuration"):
        quality.jobs_for(args)
    results = tmp_path / "results.jsonl"
    quality._append(results, {"a": 1})
    quality._append(results, {"b": 2})
    assert [json.loads(x) for x in results.read_text().splitlines()] == [{"a": 1}, {"b": 2}]


def test_results_files_merge_and_a_repeated_seed_is_refused(tmp_path: Path) -> None:
    def write(name: str, *rows: Any) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    a = write(
        "a.jsonl",
        _run("t", "qlora-nf4", 1, 0.60, 0.21, 3.0),
        _run("t", "lora-16bit", 1, 0.64, 0.20, 2.0),
    )
    b = write(
        "b.jsonl",
        _run("t", "qlora-nf4", 2, 0.62, 0.22, 3.0),
        _run("t", "lora-16bit", 2, 0.68, 0.19, 2.0),
    )
    rows = summ.load_all([a, b])
    (comp,) = [x for x in summ.comparisons(rows) if x["a"] == "qlora-nf4"]
    assert comp["seeds"] == [1, 2]  # paired over the seeds of both files
    assert comp["acc_diff"] == pytest.approx(-0.05)  # mean of -0.04 and -0.06
    c = write("c.jsonl", _run("t", "qlora-nf4", 2, 0.5, 0.3, 3.0))
    with pytest.raises(SystemExit, match="run t qlora-nf4 2 is also in"):
        summ.load_all([a, b, c])
