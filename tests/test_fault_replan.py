"""Out-of-memory re-planning: the effective batch never changes, classes only grow, bounded."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from runner.checkpoints import training_hash
from runner.errors import PlanError
from runner.plan import make_plan
from runner.plan.classes import GpuClassTable, load_gpu_classes
from runner.plan.replan import apply_replan, replan_after_oom
from runner.plan.types import GpuClass, Plan
from runner.settings import Settings
from runner.spec import validate_document

TABLE = GpuClassTable(
    classes=(GpuClass("24GB", 22500), GpuClass("48GB", 45000), GpuClass("80GB", 79000)),
    safety_margin=0.05,
    origin="test",
)
SPEC = """
apiVersion: qlora-runner.io/v1alpha1
kind: FineTuneJob
metadata: {name: oom}
spec:
  model: {source: s3://models/llama}
  dataset: {sources: [s3://data/train.jsonl]}
  training: {target_effective_batch_size: 16, max_seq_length: 4096}
  output: {uri: s3://adapters/oom}
"""
CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
}


def plan_of(micro: int, accum: int, cls: str = "24GB") -> Plan:
    gpu = next(c for c in TABLE.classes if c.name == cls)
    return Plan(
        spec_hash="ab" * 32,
        gpu_class=gpu,
        backend="unsloth",
        quant_mode="4bit",
        micro_batch_size=micro,
        gradient_accumulation_steps=accum,
        vram_terms=(),
        vram_estimate_bytes=1,
        host_memory_bytes=1,
        cpu_cores=4,
        tokens_per_step=1,
    )


@pytest.mark.parametrize(
    ("micro", "accum", "cls", "expected"),
    [
        (8, 2, "24GB", (4, 4, "24GB")),
        (2, 8, "24GB", (1, 16, "24GB")),
        (6, 1, "48GB", (3, 2, "48GB")),
        (3, 5, "24GB", (1, 15, "24GB")),  # not 3 // 2: the effective batch stays 15
        (1, 16, "24GB", (1, 16, "48GB")),
        (1, 16, "48GB", (1, 16, "80GB")),
    ],
    ids=["halve", "to-one", "even-on-48", "odd", "next-class", "next-class-2"],
)
def test_next_layout(micro: int, accum: int, cls: str, expected: tuple[int, int, str]) -> None:
    step = replan_after_oom(plan_of(micro, accum, cls), TABLE, attempt=1)
    assert (step.micro_batch_size, step.gradient_accumulation_steps, step.gpu_class) == expected
    assert step.effective_batch_size == micro * accum
    assert "re-plan 1/3" in step.reason


def test_largest_class_with_micro_batch_one_gives_up_clearly() -> None:
    with pytest.raises(PlanError, match=r"largest class \(80GB\).*max_seq_length"):
        replan_after_oom(plan_of(1, 16, "80GB"), TABLE, attempt=1)


def test_retries_are_bounded() -> None:
    with pytest.raises(PlanError, match="stopped after 3 re-plans"):
        replan_after_oom(plan_of(8, 2), TABLE, attempt=4)
    with pytest.raises(PlanError, match="stopped after 1 re-plans"):
        replan_after_oom(plan_of(8, 2), TABLE, attempt=2, max_attempts=1)


@given(micro=st.integers(1, 1024), accum=st.integers(1, 256))
def test_effective_batch_is_invariant(micro: int, accum: int) -> None:
    step = replan_after_oom(plan_of(micro, accum), TABLE, attempt=1)
    assert step.effective_batch_size == micro * accum
    assert step.micro_batch_size < micro or step.gpu_class != "24GB"


def test_a_chain_of_replans_ends_on_a_larger_class_or_stops() -> None:
    plan, seen = plan_of(8, 2), []
    for attempt in range(1, 8):
        try:
            step = replan_after_oom(plan, TABLE, attempt, max_attempts=7)
        except PlanError:
            break
        seen.append((step.micro_batch_size, step.gradient_accumulation_steps, step.gpu_class))
        gpu = next(c for c in TABLE.classes if c.name == step.gpu_class)
        plan = replace(
            plan,
            micro_batch_size=step.micro_batch_size,
            gradient_accumulation_steps=step.gradient_accumulation_steps,
            gpu_class=gpu,
        )
    assert seen == [
        (4, 4, "24GB"),
        (2, 8, "24GB"),
        (1, 16, "24GB"),
        (1, 16, "48GB"),
        (1, 16, "80GB"),
    ]


def test_applied_replan_is_planned_as_asked_and_keeps_the_checkpoints() -> None:
    """The re-planned document validates, the planner keeps its layout, and its training hash
    is the original's, so the new attempt resumes from the last checkpoint."""
    doc = yaml.safe_load(SPEC)
    original = validate_document(doc)
    settings = Settings()
    first = make_plan(original, settings, model_config=CONFIG)
    step = replan_after_oom(first, load_gpu_classes(settings), attempt=1)
    replanned = validate_document(apply_replan(doc, step))
    assert doc["spec"].get("resources") is None  # the caller's document is not modified
    second = make_plan(replanned, settings, model_config=CONFIG)
    assert second.micro_batch_size == step.micro_batch_size
    assert second.gradient_accumulation_steps == step.gradient_accumulation_steps
    assert second.gpu_class.name == step.gpu_class
    assert training_hash(replanned) == training_hash(original)
