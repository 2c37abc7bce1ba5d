"""Turning the spec's 'auto' values into concrete numbers for this run.

In the cluster the planner has already decided: ``plan.json`` sits next to the mounted spec,
and its micro batch, accumulation and precision are used as they are, so the pod trains with
the shape the GPU class was chosen for. Without a plan (a laptop, CI, ``qlora run`` by hand)
'auto' is resolved here with conservative defaults, and every choice is returned as a reason
line for the log. Pure code: no torch; the caller says whether CUDA and bf16 are available.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runner.plan.types import Plan
from runner.spec.model import JobBody, QuantMode
from runner.train.backend import BatchShape, Precision

CPU_MICRO_BATCH = 4
"""Micro batch on the CPU without a plan: small sequences, memory is not the limit."""
GPU_MICRO_BATCH_NO_PLAN = 1
"""Micro batch on a GPU without a plan: the safe choice when nothing estimated the VRAM."""


@dataclass(frozen=True)
class Resolved:
    """Everything 'auto' in the spec, decided."""

    precision: Precision
    shape: BatchShape
    reasons: tuple[str, ...]


def resolve(
    body: JobBody, plan: Plan | None, *, cuda: bool, bf16: bool, world_size: int = 1
) -> Resolved:
    """Decide precision and batch shape.

    Args:
        body: The job spec body.
        plan: ``plan.json`` next to the spec, if any.
        cuda: Whether a CUDA device is visible.
        bf16: Whether that device supports bfloat16.
        world_size: Ranks training together; without a plan the accumulation is chosen so
            that micro batch x accumulation x world size is the target effective batch.
    """
    t, q = body.training, body.quantization
    reasons: list[str] = []
    if plan is not None:
        quant, micro, accum = (
            plan.quant_mode,
            plan.micro_batch_size,
            plan.gradient_accumulation_steps,
        )
        reasons.append(
            f"plan.json: {quant}, micro batch {micro} x accumulation {accum} "
            f"(class {plan.gpu_class.name})"
        )
        if t.micro_batch_size != "auto" and t.micro_batch_size != micro:
            reasons.append(f"plan.json overrides training.micro_batch_size {t.micro_batch_size}")
    else:
        quant = "4bit" if q.mode is QuantMode.AUTO else q.mode.value
        if q.mode is QuantMode.AUTO:
            reasons.append("no plan.json: quantization.mode auto -> 4bit (QLoRA)")
        default_micro = CPU_MICRO_BATCH if not cuda else GPU_MICRO_BATCH_NO_PLAN
        micro = t.micro_batch_size if t.micro_batch_size != "auto" else default_micro
        micro = min(micro, t.target_effective_batch_size)
        if t.gradient_accumulation_steps != "auto":
            accum = t.gradient_accumulation_steps
        else:
            accum = max(1, math.ceil(t.target_effective_batch_size / (micro * world_size)))
        if "auto" in (t.micro_batch_size, t.gradient_accumulation_steps):
            reasons.append(
                f"no plan.json: micro batch {micro} x accumulation {accum}"
                + (f" x {world_size} ranks " if world_size > 1 else " ")
                + f"(target effective batch {t.target_effective_batch_size}, "
                f"{'GPU' if cuda else 'CPU'} defaults)"
            )
    if q.compute_dtype != "auto":
        dtype = q.compute_dtype
    else:
        dtype = ("bfloat16" if bf16 else "float16") if cuda else "float32"
        reasons.append(f"compute dtype auto -> {dtype}")
    precision = Precision(quant, dtype, q.quant_type, q.double_quant)
    checkpointing, layers = t.gradient_checkpointing, None
    if plan is not None and plan.gradient_checkpointing is not None:
        checkpointing, layers = plan.gradient_checkpointing, plan.checkpointed_layers
        if checkpointing != t.gradient_checkpointing or layers is not None:
            reasons.append(
                "plan.json: gradient checkpointing "
                + ("off" if not checkpointing else f"on the first {layers} layers only")
                + " (the class has room)"
            )
    shape = BatchShape(
        micro_batch_size=micro,
        gradient_accumulation_steps=accum,
        max_seq_length=t.max_seq_length,
        epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler=t.lr_scheduler,
        warmup_ratio=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optimizer=t.optimizer,
        seed=t.seed,
        gradient_checkpointing=checkpointing,
        logging_steps=t.logging_steps,
        checkpoint_every_steps=t.checkpoint_every_steps,
        completion_only_loss=body.dataset.train_on == "completions",
        packing=t.packing,
        checkpointed_layers=layers if checkpointing else None,
    )
    return Resolved(precision, shape, tuple(reasons))
