"""Data-aware planning: row order, token budgets, partial checkpointing, qlora plan --data."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from runner.errors import DataError
from runner.plan import make_plan
from runner.plan.estimator import TrainingShape, estimate, partial_checkpointing_layers
from runner.plan.lengths import batch_order, micro_batch_tokens, profile, read_text_lengths
from runner.plan.shapes import shape_from_config
from runner.settings import load_settings
from runner.spec import load_spec
from runner.train.backend import TokenizedExample
from runner.train.ordering import order_rows

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "llama-3.1-8b.yaml"


def _lengths(n: int = 400) -> list[int]:
    rng = random.Random(0)
    return [min(2048, max(8, int(rng.lognormvariate(5.967, 0.85)))) for _ in range(n)]


def test_order_keeps_the_rows_of_each_step_and_balances_tokens() -> None:
    lengths = _lengths()
    batches = batch_order(lengths, 4, 4, seed=3, padding_free=True)
    perm = list(range(len(lengths)))
    random.Random(3).shuffle(perm)
    for s in range(len(batches) // 4):
        step = [i for b in batches[4 * s : 4 * s + 4] for i in b]
        assert sorted(step) == sorted(perm[16 * s : 16 * s + 16])  # same rows per step
        assert all(len(b) == 4 for b in batches[4 * s : 4 * s + 4])
    balanced = max(micro_batch_tokens(lengths, batches))
    naive = max(sum(lengths[i] for i in perm[j : j + 4]) for j in range(0, len(perm), 4))
    assert balanced < naive


def test_padded_order_groups_by_length() -> None:
    lengths = _lengths()
    batches = batch_order(lengths, 4, 4, seed=3, padding_free=False)
    padded = sum(micro_batch_tokens(lengths, batches, padding_free=False))
    perm = list(range(len(lengths)))
    random.Random(3).shuffle(perm)
    naive = sum(4 * max(lengths[i] for i in perm[j : j + 4]) for j in range(0, len(perm), 4))
    assert padded < naive


def test_trainer_order_matches_the_plans_peak() -> None:
    lengths = _lengths(100)
    rows = [TokenizedExample([1] * n, [1] * n, f"row {i}") for i, n in enumerate(lengths)]
    laid = order_rows(rows, 8, 2, seed=5, epochs=1.5, padding_free=True)
    assert len(laid.examples) == 200 and math.isclose(laid.epochs, 0.75)
    prof = profile(lengths, 2048, "test")
    from runner.plan.lengths import peak_micro_batch_tokens

    assert laid.peak_tokens >= peak_micro_batch_tokens(prof, 8, 2, seed=5)


def test_tokens_per_micro_batch_drive_the_estimate() -> None:
    shape = shape_from_config(_cfg())
    worst = TrainingShape("4bit", "unsloth", 16, 2048, 16)
    real = TrainingShape("4bit", "unsloth", 16, 2048, 16, tokens_per_micro_batch=9000)
    assert estimate(shape, real).total_bytes < estimate(shape, worst).total_bytes


def _cfg() -> dict:
    from runner.plan import bundled_config

    return dict(bundled_config("llama-3.1-8b").config)


def test_partial_checkpointing_fits_the_budget_and_grows_with_it() -> None:
    shape = shape_from_config(_cfg())
    t = TrainingShape("4bit", "unsloth", 16, 2048, 16, tokens_per_micro_batch=9000)
    full = estimate(shape, t).total_bytes
    k_small = partial_checkpointing_layers(shape, t, full + 2 * 1024**3)
    k_big = partial_checkpointing_layers(shape, t, full + 20 * 1024**3)
    assert 0 <= k_big < k_small < shape.num_layers
    part = TrainingShape(
        "4bit", "unsloth", 16, 2048, 16, tokens_per_micro_batch=9000, checkpointed_layers=k_small
    )
    assert full < estimate(shape, part).total_bytes <= full + 2 * 1024**3


def test_plan_from_data_uses_tokens_and_spare_memory(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    rng = random.Random(1)
    with data.open("w") as fh:
        for n in _lengths(600):
            fh.write(json.dumps({"text": " ".join("word" for _ in range(int(n * 0.8)))}) + "\n")
    from runner.plan.data_lengths import lengths_for_plan

    spec = load_spec(str(EXAMPLE))
    lengths = lengths_for_plan(spec, str(data))
    assert "characters" in lengths.source
    plain = make_plan(spec, load_settings())
    aware = make_plan(spec, load_settings(), lengths=lengths)
    assert aware.gpu_class.name == plain.gpu_class.name
    assert aware.micro_batch_size * aware.gradient_accumulation_steps == (
        plain.micro_batch_size * plain.gradient_accumulation_steps
    )
    assert aware.peak_micro_batch_tokens is not None
    assert aware.peak_micro_batch_tokens < plain.micro_batch_size * 2048
    assert aware.checkpointed_layers is not None or aware.gradient_checkpointing is False
    assert aware.vram_estimate_bytes <= aware.usable_memory_bytes
    _ = rng


def test_bad_data_file_is_a_path_message(tmp_path: Path) -> None:
    bad = tmp_path / "x.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match=r"x.jsonl: row 1: not JSON"):
        read_text_lengths(bad)


BENCH = Path(__file__).resolve().parents[1] / "bench" / "speed"
RAN_CHECKPOINTED_LAYERS = 27
"""run5's qlora-24gb plan said 28, but the runner then counted the backbone as a layer (fixed
since, ``test_speedups.py``), so layers 27-31 ran uncheckpointed (bench/README.md)."""


def _config(name: str) -> dict[str, Any]:
    from runner.plan import bundled_config

    found = bundled_config(name)
    assert found is not None
    return dict(found.config)


def _run(folder: str, runner: str, name: str = "results.jsonl") -> dict[str, Any]:
    lines = (BENCH / folder / name).read_text().splitlines()
    return next(r for r in map(json.loads, lines) if r.get("runner") == runner)


def _measured_plan(rec: dict[str, Any], layers: int | None = None) -> tuple[float, int, int]:
    """(estimate reserved, measured reserved, measured allocated) of the plan that ran."""
    shape = shape_from_config(_config(rec["shape"]))
    rp = rec["replan"]
    k = layers if layers is not None else rp["checkpointed_layers"]
    t = TrainingShape(
        "4bit",
        "unsloth",
        rp["micro_batch_size"],
        2048,
        16,
        tokens_per_micro_batch=rp["peak_micro_batch_tokens"],
        gradient_checkpointing=bool(rp["gradient_checkpointing"]),
        checkpointed_layers=k if rp["gradient_checkpointing"] else None,
    )
    return (
        float(estimate(shape, t).reserved_bytes),
        int(rec["qlora_gpu_memory_peak_reserved_bytes"]),
        int(rec["qlora_gpu_memory_peak_allocated_bytes"]),
    )


def test_estimate_holds_where_the_allocator_did_not_fragment() -> None:
    """run6's 80GB plan (28 of 32 layers kept): reserved was 3.6 % above allocated, so the
    reserved peak measures the plan; the old hand count said +65 % here."""
    est, reserved, allocated = _measured_plan(_run("run6-data", "qlora-80gb"))
    assert reserved / allocated < 1.05
    assert -0.05 <= est / reserved - 1 <= 0.15, est / reserved


@pytest.mark.parametrize(
    ("folder", "runner", "layers"),
    [
        ("run5-data", "qlora-24gb", RAN_CHECKPOINTED_LAYERS),
        ("run6-data", "qlora-80gb", None),
        ("run6-data", "qlora-1b", None),
    ],
)
def test_estimate_covers_the_allocated_peak_of_every_realistic_run(
    folder: str, runner: str, layers: int | None
) -> None:
    """Every realistic-data run: never under the allocated peak, at most 25 % over it. Their
    reserved peaks (run5 +60 %, run6 1B 4.9x allocated) came from the default allocator's
    fragmentation under varying micro-batch sizes, which expandable segments avoid
    (``runner.train.speedups.allocator_env``, in effect since session 7's fix)."""
    est, _, allocated = _measured_plan(_run(folder, runner), layers)
    assert 0.0 <= est / allocated - 1 <= 0.25, est / allocated


def test_unsloth_kept_count_is_close_to_what_run6_kept() -> None:
    """Per kept layer and token, run6 measured (allocated - persistent - one layer's backward
    transients) / (kept layers x tokens): 8B 101 KiB, 1B 52 KiB; the count must be within
    0 .. +12 % above that."""
    from runner.plan.estimator import unsloth_kept_bytes_per_token

    for runner, kept_layers, measured_kib in (("qlora-80gb", 28, 101.2), ("qlora-1b", 14, 52.4)):
        rec = _run("run6-data", runner)
        shape = shape_from_config(_config(rec["shape"]))
        t = TrainingShape("4bit", "unsloth", 16, 2048, 16)
        count = unsloth_kept_bytes_per_token(shape, t) / 1024
        assert 1.0 <= count / measured_kib <= 1.12, (runner, count)
        assert shape.num_layers - rec["replan"]["checkpointed_layers"] == kept_layers


def test_qlora_plan_data_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from runner.cli import main
    from runner.errors import ExitCode

    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"text": "word " * int(n * 0.8)}) + "\n" for n in _lengths(200))
    )
    assert main(["plan", str(EXAMPLE), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "largest micro batch:" in out and "characters / 3.6" in out
    assert main(["plan", str(EXAMPLE), "--data", str(tmp_path / "none.jsonl")]) == (
        ExitCode.INVALID_INPUT
    )
    assert "none.jsonl: no such data file" in capsys.readouterr().err


def test_resolve_takes_the_plans_checkpointing() -> None:
    from runner.train.resolve import resolve

    spec = load_spec(str(EXAMPLE))
    plan = make_plan(spec, load_settings(), lengths=profile(_lengths(300), 2048, "test"))
    shape = resolve(spec.spec, plan, cuda=True, bf16=True).shape
    assert shape.gradient_checkpointing is plan.gradient_checkpointing
    assert shape.checkpointed_layers == plan.checkpointed_layers
    assert shape.micro_batch_size == plan.micro_batch_size


RUN7_PLANS = {
    # runner: (shape, checkpointed layers of the pod's re-plan, largest micro batch) from the
    # re-plan lines of bench/speed/run7-data/log-*.txt; the 80GB run's log did not come back:
    # same rows, seed and micro batch as the others, so the same 12,949-token peak.
    "qlora-1b": ("llama-3.2-1b", 0, 12949),
    "qlora-24gb": ("llama-3.1-8b", 23, 12949),
    "qlora-80gb": ("llama-3.1-8b", 0, 12949),
}


def _run7(runner: str) -> tuple[float, int, int]:
    lines = (BENCH / "run7-data" / "results-printed.jsonl").read_text().splitlines()
    rec = next(r for r in map(json.loads, lines) if r.get("runner") == runner)
    name, k, tokens = RUN7_PLANS[runner]
    t = TrainingShape(
        "4bit",
        "unsloth",
        16,
        2048,
        16,
        tokens_per_micro_batch=tokens,
        gradient_checkpointing=k > 0,
        checkpointed_layers=k or None,
    )
    est = float(estimate(shape_from_config(_config(name)), t).reserved_bytes)
    return (
        est,
        int(rec["qlora_gpu_memory_peak_reserved_bytes"]),
        int(rec["qlora_gpu_memory_peak_allocated_bytes"]),
    )


@pytest.mark.parametrize("runner", ["qlora-1b", "qlora-24gb"])
def test_estimate_holds_for_run7s_picked_plans(runner: str) -> None:
    """Issue 13's bound (-5 % .. +15 % of peak reserved) on the plans the pod picked: 1B
    without checkpointing +5.5 %, 8B 24GB (23 of 32) +2.7 %. The runner meant these to run
    with expandable segments, but it set the variable after torch was imported (fixed in
    session 7, tests/test_allocator.py): run7 to run9 ran the default allocator."""
    est, reserved, _ = _run7(runner)
    assert -0.05 <= est / reserved - 1 <= 0.15, est / reserved


def test_run7_80gb_estimate_covers_allocated() -> None:
    est, _, allocated = _run7("qlora-80gb")
    assert 0.0 <= est / allocated - 1 <= 0.15, est / allocated


def _picked(runner: str, folder: str = "run8-data") -> tuple[float, int]:
    """The current estimator on the plan a speed call's pod picked (its re-plan), and the
    highest peak reserved of the training, verification and evaluation phases."""
    rec = _run(folder, runner, "speed-results.jsonl")
    est, _, _ = _measured_plan(rec)
    phases = ("training", "verifying", "evaluating")
    return est, max(int(rec["replan"][f"{p}_peak_reserved_bytes"]) for p in phases)


@pytest.mark.parametrize("runner", ["qlora-24gb", "qlora-80gb"])
def test_estimate_holds_for_run8s_picked_plans(runner: str) -> None:
    """Issue 13's bound on run8 (one H200 call, bench/speed/run8-data): 8B 24GB-class plan
    (the pod re-planned 23 of 32 layers checkpointed) and 80GB-class plan (none), against the
    highest allocator peak of the training, verification and evaluation phases. The 24GB
    run's evaluation reserved 21.6 GB against training's 20.4 (allocated the same): -2.7 %
    against that, +2.7 % against training's; the 80GB run's three phases peaked alike (+2.8 %)."""
    est, reserved = _picked(runner)
    assert -0.05 <= est / reserved - 1 <= 0.15, est / reserved


@pytest.mark.parametrize("runner", ["qlora-24gb", "qlora-80gb"])
def test_estimate_holds_for_run10s_picked_plans(runner: str) -> None:
    """The same plans in run10 (bench/speed/run10-data), the first speed call in which the
    expandable segments the runner asks for were in effect: reserved fell to 18.4 and 47.6
    GiB (allocated the same as run8's), so the estimate is +6.2 % and +5.7 % of them."""
    est, reserved = _picked(runner, "run10-data")
    assert -0.05 <= est / reserved - 1 <= 0.15, est / reserved


@pytest.mark.xfail(
    strict=True,
    reason="run7's record only: its 80GB plan (no checkpointing) reserved 60.1 GiB for 47.5 "
    "allocated (+27 %, the default allocator: the expandable segments asked for were set too "
    "late; and the evaluation phase, whose batches grew, since fixed); the estimate is -16 % "
    "of that. run8 re-measured it after the evaluation fix (+2.8 %), run10 after the "
    "allocator fix (+5.7 %)",
)
def test_run7_80gb_estimate_holds_against_reserved() -> None:
    est, reserved, _ = _run7("qlora-80gb")
    assert -0.05 <= est / reserved - 1 <= 0.15, est / reserved
