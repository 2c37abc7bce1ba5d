"""What to try after a CUDA out-of-memory exit (6): a pure decision, shared by the watchers.

The planner's estimate was too low for this model, data and card. The next attempt keeps the
optimisation identical and only changes how it is laid out on hardware:

1. **Smaller micro batch, more accumulation.** Divide the micro batch by its smallest prime
   factor (2 for even sizes: "half the micro batch, double the accumulation") and multiply
   the accumulation by the same factor, so ``micro x accumulation`` (the effective batch) is
   exactly unchanged. An odd micro batch such as 3 goes to 1 with 3x the accumulation rather
   than to ``3 // 2``, which would silently shrink the effective batch.
2. **Next GPU class.** Once the micro batch is 1, move to the next class of the table with
   more memory per GPU, micro batch 1 and the same accumulation.
3. Nothing larger: give up with a :class:`PlanError` that says what to change.

The training hash of the checkpoints (:func:`runner.checkpoints.training_hash`) ignores these
fields, so the new attempt resumes from the last checkpoint. Retries are bounded by the
caller (``max_attempts``) and each one is recorded in the FineTuneJob status and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.errors import PlanError
from runner.plan.classes import GpuClassTable
from runner.plan.types import Plan

DEFAULT_MAX_ATTEMPTS = 3
"""Re-plans after out-of-memory exits before a job is failed for good."""


@dataclass(frozen=True)
class Replan:
    """The layout of the next attempt.

    Attributes:
        attempt: 1 for the first re-plan, 2 for the second, ...
        micro_batch_size: Sequences per forward pass.
        gradient_accumulation_steps: Micro batches per optimizer step.
        gpu_class: The class to run on (the same or the next larger).
        reason: One line for status, events and logs.
    """

    attempt: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    gpu_class: str
    reason: str

    @property
    def effective_batch_size(self) -> int:
        """Sequences per optimizer step (unchanged by a re-plan)."""
        return self.micro_batch_size * self.gradient_accumulation_steps


def _smallest_factor(n: int) -> int:
    for f in range(2, int(n**0.5) + 1):
        if n % f == 0:
            return f
    return n


def replan_after_oom(
    plan: Plan,
    table: GpuClassTable,
    attempt: int = 1,
    *,
    max_attempts: int | None = DEFAULT_MAX_ATTEMPTS,
) -> Replan:
    """The next layout after attempt ``attempt - 1`` (planned as ``plan``) ran out of memory.

    Args:
        plan: The plan that ran out of memory.
        table: The GPU class table.
        attempt: The number of this re-plan (1 for the first).
        max_attempts: Bound on re-plans; None when the caller bounds them itself.

    Raises:
        PlanError: the bound is reached, or micro batch 1 ran out of memory on the largest
            class (exit code 3; the message names what to change).
    """
    micro, accum, current = (
        plan.micro_batch_size,
        plan.gradient_accumulation_steps,
        plan.gpu_class,
    )
    of = f"{attempt}/{max_attempts}" if max_attempts is not None else str(attempt)
    if max_attempts is not None and attempt > max_attempts:
        raise PlanError(
            f"out of GPU memory {attempt} times (micro batch {micro} x accumulation {accum} "
            f"on {current.name}); stopped after {max_attempts} re-plans: lower "
            "training.max_seq_length or pick a larger resources.gpu_class"
        )
    if micro > 1:
        factor = _smallest_factor(micro)
        return Replan(
            attempt,
            micro // factor,
            accum * factor,
            current.name,
            f"out of GPU memory with micro batch {micro} x {accum} on {current.name}; "
            f"re-plan {of}: micro batch {micro // factor} x "
            f"{accum * factor} (effective batch {micro * accum} unchanged)",
        )
    larger = [c for c in table.classes if c.min_memory_mib > current.min_memory_mib]
    if not larger:
        raise PlanError(
            f"out of GPU memory with micro batch 1 on the largest class ({current.name}); "
            "lower training.max_seq_length or use quantization.mode: 4bit"
        )
    nxt = min(larger, key=lambda c: (c.min_memory_mib, c.gpu_count))
    return Replan(
        attempt,
        1,
        accum,
        nxt.name,
        f"out of GPU memory with micro batch 1 on {current.name}; re-plan "
        f"{of}: next GPU class {nxt.name}, micro batch 1 x {accum}",
    )


def apply_replan(document: dict[str, Any], replan: Replan) -> dict[str, Any]:
    """A copy of a job-spec document with the re-planned layout pinned in it.

    The planner then plans that document like any other (micro batch and accumulation are no
    longer 'auto', the class is named), and validates it.
    """
    doc = {**document, "spec": dict(document.get("spec") or {})}
    spec = doc["spec"]
    spec["training"] = {
        **(spec.get("training") or {}),
        "micro_batch_size": replan.micro_batch_size,
        "gradient_accumulation_steps": replan.gradient_accumulation_steps,
    }
    spec["resources"] = {**(spec.get("resources") or {}), "gpu_class": replan.gpu_class}
    return doc
