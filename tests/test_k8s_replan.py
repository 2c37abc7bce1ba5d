"""The out-of-memory re-plan rule (pure): smaller micro batch first, then a larger class."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.errors import PlanError
from runner.k8s.replan import next_attempt_spec, plan_attempt
from runner.plan import GpuClass, Plan, load_gpu_classes, make_plan
from runner.settings import Settings
from runner.spec import load_spec

SPEC_8B = Path(__file__).resolve().parent.parent / "examples" / "llama-3.1-8b.yaml"


def _plan(gpu_class: GpuClass, micro: int, accum: int) -> Plan:
    return Plan(spec_hash="0" * 64, gpu_class=gpu_class, backend="unsloth", quant_mode="4bit",
                micro_batch_size=micro, gradient_accumulation_steps=accum, vram_terms=(),
                vram_estimate_bytes=1, host_memory_bytes=1, cpu_cores=1, tokens_per_step=1)


def test_halves_the_micro_batch_and_keeps_the_effective_batch() -> None:
    spec, classes = load_spec(SPEC_8B), load_gpu_classes(Settings()).classes
    nxt = next_attempt_spec(spec, _plan(classes[0], 8, 2), Settings())
    assert (nxt.spec.training.micro_batch_size, nxt.spec.training.gradient_accumulation_steps) \
        == (4, 4)
    # Pinned to the class that ran out of memory: with 'auto' and a smaller micro batch the
    # (too low) estimate could pick an even smaller class.
    assert nxt.spec.resources.gpu_class == classes[0].name


def test_at_micro_batch_one_moves_to_the_next_class_then_gives_up() -> None:
    spec, classes = load_spec(SPEC_8B), load_gpu_classes(Settings()).classes
    nxt = next_attempt_spec(spec, _plan(classes[0], 1, 16), Settings())
    assert nxt.spec.resources.gpu_class == classes[1].name
    assert nxt.spec.training.gradient_accumulation_steps == 16
    with pytest.raises(PlanError, match="largest class"):
        next_attempt_spec(spec, _plan(classes[-1], 1, 16), Settings())


def test_plan_attempt_with_the_real_planner() -> None:
    spec, settings = load_spec(SPEC_8B), Settings()
    _, first = plan_attempt(spec, 0, settings, make_plan)
    _, second = plan_attempt(spec, 1, settings, make_plan)
    assert second.micro_batch_size * 2 == first.micro_batch_size
    assert second.gradient_accumulation_steps == 2 * first.gradient_accumulation_steps
