"""What to try after a job ran out of GPU memory (exit code 6): the next, smaller plan.

Shared by ``qlora submit --wait`` and the operator so both retry the same way: a spec and its
plan in, the spec of the next attempt out (the caller plans it again and bounds the number of
attempts). The rule is :mod:`runner.plan.replan`'s: first a smaller micro batch with more
gradient accumulation (the effective batch stays exactly the same), then, at micro batch 1, the
next larger GPU class; nothing larger left is a :class:`~runner.errors.PlanError`.
"""

from __future__ import annotations

from collections.abc import Callable

from runner.plan import Plan, load_gpu_classes
from runner.plan.replan import apply_replan, replan_after_oom
from runner.settings import Settings
from runner.spec import JobSpec, validate_document

Planner = Callable[[JobSpec, Settings], Plan]


def next_attempt_spec(spec: JobSpec, plan: Plan, settings: Settings) -> JobSpec:
    """The spec to plan after ``plan`` ran out of GPU memory.

    Raises:
        PlanError: the micro batch is 1 on the largest class already.
    """
    # The rule itself is runner.plan.replan (pure; it also keeps odd micro batches' effective
    # batch exact); the number of attempts is bounded by the caller.
    step = replan_after_oom(plan, load_gpu_classes(settings), max_attempts=None)
    doc = apply_replan(spec.model_dump(mode="json", by_alias=True), step)
    return validate_document(doc, source="re-plan after running out of GPU memory")


def plan_attempt(
    spec: JobSpec, attempt: int, settings: Settings, planner: Planner
) -> tuple[JobSpec, Plan]:
    """The spec and plan of re-plan number ``attempt`` (0 is the spec's own plan).

    Raises:
        PlanError: the spec fits nothing, or no smaller plan is left.
    """
    plan = planner(spec, settings)
    for _ in range(attempt):
        spec = next_attempt_spec(spec, plan, settings)
        plan = planner(spec, settings)
    return spec, plan
