"""Dynamic 4-bit's pure core: ranking, the budget, what a kept module costs, the plan's budget.

Milliseconds, no torch: :mod:`runner.plan.dynamic_quant` decides from scores the training layer
measured; the planner computes the budget and counts it in the estimate.
"""

from __future__ import annotations

from typing import Any

import pytest

from runner.plan import bundled_config, estimate, make_plan, shape_from_config
from runner.plan.dynamic_quant import (
    MIB,
    ModuleScore,
    all_linear_extra_bytes,
    budget_bytes,
    rank,
    select,
)
from runner.plan.estimator import NF4_DQ_BYTES_PER_PARAM, TrainingShape, kept_module_extra_bytes
from runner.settings import Settings
from runner.spec import validate_document

LLAMA_8B = "hf://meta-llama/Llama-3.1-8B-Instruct@main"


def _m(name: str, score: float, extra: int) -> ModuleScore:
    return ModuleScore(name, score, extra)


SCORES = [
    _m("layers.0.q", 0.10, 40),
    _m("layers.0.down", 0.30, 100),
    _m("layers.1.k", 0.20, 10),
    _m("layers.1.down", 0.25, 100),
    _m("layers.1.v", 0.20, 10),
]


def test_ranking_is_by_score_then_name() -> None:
    names = [m.name for m in rank(SCORES)]
    assert names == ["layers.0.down", "layers.1.down", "layers.1.k", "layers.1.v", "layers.0.q"]


@pytest.mark.parametrize(
    ("budget", "kept"),
    [
        (0, []),
        (99, ["layers.1.k", "layers.1.v", "layers.0.q"]),  # the downs do not fit: passed over
        (100, ["layers.0.down"]),
        (125, ["layers.0.down", "layers.1.k", "layers.1.v"]),
        (160, ["layers.0.down", "layers.1.k", "layers.1.v", "layers.0.q"]),
        (200, ["layers.0.down", "layers.1.down"]),
        (10**9, ["layers.0.down", "layers.1.down", "layers.1.k", "layers.1.v", "layers.0.q"]),
        (-5, []),
    ],
    ids=["zero", "only-small-fit", "exactly-one", "one-big-two-small", "all-but-one-big",
         "two-big", "everything", "negative"],
)
def test_select_keeps_the_ranking_within_the_budget(budget: int, kept: list[str]) -> None:
    chosen = select(SCORES, budget)
    assert [m.name for m in chosen.kept] == kept
    assert chosen.spent_bytes <= max(budget, 0)
    assert chosen.skip_modules == tuple(kept)
    assert [m["name"] for m in chosen.as_dict()["ranking"]] == [m.name for m in rank(SCORES)]


@pytest.mark.parametrize(
    ("usable", "rest", "cap", "everything", "want"),
    [
        (1000 * MIB, 600 * MIB, None, 10**12, 400 * MIB),
        (1000 * MIB, 600 * MIB, 50, 10**12, 50 * MIB),
        (1000 * MIB, 600 * MIB, 0.5, 10**12, MIB // 2),
        (1000 * MIB, 600 * MIB, None, 7 * MIB, 7 * MIB),
        (600 * MIB, 700 * MIB, None, 10**12, 0),
    ],
    ids=["class-leaves", "capped", "fractional-cap", "never-more-than-all", "nothing-left"],
)
def test_budget_is_usable_minus_the_rest(
    usable: int, rest: int, cap: float | None, everything: int, want: int
) -> None:
    assert budget_bytes(usable, rest, cap, everything) == want


def _t(**kw: Any) -> TrainingShape:
    base: dict[str, Any] = {
        "quant_mode": "dynamic-4bit",
        "backend": "unsloth",
        "micro_batch_size": 1,
        "seq_len": 512,
        "lora_r": 16,
    }
    return TrainingShape(**{**base, **kw})


def test_a_kept_module_costs_its_16bit_bytes_minus_its_nf4_bytes() -> None:
    p = 4096 * 14336  # Llama-3.1-8B's down_proj
    nf4 = int(p * NF4_DQ_BYTES_PER_PARAM)
    assert kept_module_extra_bytes(p, _t()) == 2 * p - nf4  # Unsloth: bf16
    # transformers: peft's prepare_model_for_kbit_training casts the kept module to fp32
    assert kept_module_extra_bytes(p, _t(backend="transformers")) == 4 * p - nf4


@pytest.mark.parametrize("backend", ["unsloth", "transformers"])
def test_the_estimate_of_a_chosen_skip_list_adds_exactly_its_extra_bytes(backend: str) -> None:
    found = bundled_config("llama-3.1-8b")
    assert found is not None
    shape = shape_from_config(found.config)
    plain = estimate(shape, _t(backend=backend, quant_mode="4bit"))
    d_in, d_out = shape.linear_dims()["q_proj"]
    kept = tuple(f"model.layers.{i}.self_attn.q_proj" for i in range(5))
    mixed = estimate(shape, _t(backend=backend, skip_modules=kept))
    extra = 5 * kept_module_extra_bytes(d_in * d_out, _t(backend=backend))
    assert mixed.total_bytes - plain.total_bytes == pytest.approx(extra, abs=8)


def _plan(**quant: Any) -> Any:
    doc = {
        "apiVersion": "qlora-runner.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "dyn"},
        "spec": {
            "model": {"source": LLAMA_8B},
            "dataset": {"sources": ["s3://datasets/train.jsonl"]},
            "output": {"uri": "s3://adapters/dyn"},
            "quantization": {"mode": "dynamic-4bit", **quant},
            "resources": {"gpu_class": "24GB"},
        },
    }
    return make_plan(validate_document(doc), Settings())


def test_the_plan_gives_dynamic_4bit_what_the_class_leaves_and_counts_it() -> None:
    plan = _plan()
    terms = {t.name: t.bytes for t in plan.vram_terms}
    budget = plan.dynamic_4bit_budget_bytes
    assert budget is not None and budget > 0
    assert terms["dynamic_4bit_kept"] == budget and "dynamic_4bit_allowance" not in terms
    assert sum(terms.values()) == plan.vram_estimate_bytes
    # Uncapped, the budget is exactly what the class leaves: the estimate fills it.
    assert plan.vram_estimate_bytes == plan.usable_memory_bytes
    line = next(r for r in plan.reasons if r.startswith("dynamic-4bit budget"))
    assert f"{budget / MIB:.1f} MiB" in line and "rest of the estimate" in line
    assert "8 training rows" in line


def test_a_capped_budget_and_the_cost_of_keeping_everything() -> None:
    plan = _plan(dynamic_budget_mib=64)
    assert plan.dynamic_4bit_budget_bytes == 64 * MIB
    assert plan.vram_estimate_bytes < plan.usable_memory_bytes
    found = bundled_config("llama-3.1-8b")
    assert found is not None
    shape = shape_from_config(found.config)
    everything = all_linear_extra_bytes(shape, _t())
    d = shape.linear_dims()
    assert everything == shape.num_layers * sum(
        kept_module_extra_bytes(a * b, _t()) for a, b in d.values()
    )
    huge = _plan(dynamic_budget_mib=10**7)  # more than the class leaves: the class wins
    rest = plan.vram_estimate_bytes - 64 * MIB
    assert huge.dynamic_4bit_budget_bytes == huge.usable_memory_bytes - rest


def test_a_prequantized_checkpoint_gets_no_budget(tmp_path: Any) -> None:
    import json

    found = bundled_config("llama-3.1-8b")
    assert found is not None
    cfg = {
        **found.config,
        "quantization_config": {
            "load_in_4bit": True,
            "llm_int8_skip_modules": ["lm_head", "model.layers.0.mlp.down_proj"],
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    doc = {
        "apiVersion": "qlora-runner.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "dyn"},
        "spec": {
            "model": {"source": str(tmp_path)},
            "dataset": {"sources": ["s3://datasets/train.jsonl"]},
            "output": {"uri": "s3://adapters/dyn"},
            "quantization": {"mode": "dynamic-4bit"},
        },
    }
    plan = make_plan(validate_document(doc), Settings())
    assert plan.dynamic_4bit_budget_bytes is None
    assert "dynamic_4bit_kept" not in {t.name for t in plan.vram_terms}
