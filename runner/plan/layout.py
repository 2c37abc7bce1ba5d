"""Data-aware batch layout: micro batch, accumulation and checkpointing for the data at hand.

Given the class the job is placed in and the data's token lengths, this picks, among the
layouts that keep the optimisation identical (``micro x accumulation`` = the target effective
batch), the one predicted fastest that the estimator says fits:

* the micro batch is sized by the tokens of its largest micro batch under the runner's row
  order (:func:`runner.plan.lengths.peak_micro_batch_tokens`), not by ``micro x max_seq_length``;
* where the class has room, checkpointing is switched off, or only the first ``k`` decoder
  layers are checkpointed (:func:`runner.plan.estimator.partial_checkpointing_layers`);
* the predicted step time is compute (4 x matmul params per token, + 2 x for the recomputed
  fraction of layers) at the assumed utilisation, plus a fixed host-side cost per micro batch
  (:data:`MICRO_BATCH_OVERHEAD_S`).

The planner uses it for ``qlora plan --data``; the pod uses it at preflight with the real
lengths, keeping the class (:func:`replan_in_class`). Pure code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from runner.plan.estimator import (
    DEFAULT_CALIBRATION,
    Calibration,
    Estimate,
    TrainingShape,
    estimate,
    partial_checkpointing_layers,
)
from runner.plan.lengths import LengthProfile, peak_micro_batch_tokens
from runner.plan.shapes import ModelShape

MICRO_BATCH_OVERHEAD_S = 0.3
"""Seconds per micro batch that do not shrink with its tokens (kernel launches of every
layer, offload copies, the collator). bench/speed/run5-data, 8B on an H200, realistic rows:
bare Unsloth's 2 x 8 median step (3.85 s) exceeds ``qlora run``'s 16 x 1 (0.93 s) by 0.42 s
per extra micro batch for about the same tokens (that script lacks the varlen attention fix,
so it is an upper bound); the issue's inferred ~0.3 s is used."""
ASSUMED_TFLOPS = 400.0
"""Only the *ratio* of compute to overhead matters for the choice; this is a mid-range card's
reachable bf16 rate (an H200 reaches ~790 in a plain matmul)."""


@dataclass(frozen=True)
class Layout:
    """One candidate layout and what it is predicted to cost.

    Attributes:
        micro_batch_size: Rows per micro batch.
        gradient_accumulation_steps: Micro batches per optimizer step.
        gradient_checkpointing: Any layer checkpointed.
        checkpointed_layers: Layers checkpointed (the first ones); None = all (or none when
            checkpointing is off).
        peak_tokens: Tokens of the largest micro batch.
        estimate: The estimator's answer for it.
        step_s: Predicted seconds per optimizer step (for ranking only).
    """

    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    checkpointed_layers: int | None
    peak_tokens: int
    estimate: Estimate
    step_s: float

    def describe(self, num_layers: int) -> str:
        """Short text for the plan's reasons."""
        if not self.gradient_checkpointing:
            ckpt = "no gradient checkpointing"
        elif self.checkpointed_layers is None or self.checkpointed_layers >= num_layers:
            ckpt = "all layers checkpointed"
        else:
            ckpt = f"first {self.checkpointed_layers} of {num_layers} layers checkpointed"
        return (
            f"micro batch {self.micro_batch_size} x {self.gradient_accumulation_steps}, "
            f"largest micro batch {self.peak_tokens:,} tokens, {ckpt}"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def step_seconds(
    shape: ModelShape,
    lengths: LengthProfile,
    effective_batch: int,
    accumulation: int,
    checkpointed_fraction: float,
    tflops: float = ASSUMED_TFLOPS,
) -> float:
    """Predicted seconds per optimizer step (compute + per-micro-batch overhead)."""
    tokens = effective_batch * lengths.mean
    flops = tokens * shape.matmul_params * (4.0 + 2.0 * checkpointed_fraction)
    return flops / (tflops * 1e12) + accumulation * MICRO_BATCH_OVERHEAD_S


def choose_layout(
    shape: ModelShape,
    base: TrainingShape,
    lengths: LengthProfile,
    *,
    budget_bytes: int,
    effective_batch: int,
    seed: int,
    micro_batches: list[int] | None = None,
    allow_checkpointing_change: bool = True,
    cal: Calibration = DEFAULT_CALIBRATION,
) -> Layout | None:
    """The fastest layout that fits ``budget_bytes``; None when none does.

    Args:
        shape: Model sizes.
        base: The training shape from the spec (precision, backend, rank, checkpointing).
        lengths: The data's token lengths.
        budget_bytes: The class's usable memory.
        effective_batch: Rows per optimizer step (kept exactly).
        seed: ``training.seed`` (the row order depends on it).
        micro_batches: Candidate micro batches (default: divisors of ``effective_batch``).
        allow_checkpointing_change: Whether the layout may checkpoint fewer layers than the
            spec says (False when the spec sets ``gradient_checkpointing`` explicitly).
        cal: Estimator constants.
    """
    padding_free = base.backend == "unsloth"
    best: Layout | None = None
    for m in sorted(micro_batches or _divisors(effective_batch), reverse=True):
        a = max(1, -(-effective_batch // m))
        peak = peak_micro_batch_tokens(lengths, m, a, seed=seed, padding_free=padding_free)
        t = dataclasses.replace(base, micro_batch_size=m, tokens_per_micro_batch=peak)
        if estimate(shape, t, cal).total_bytes > budget_bytes:
            continue
        k: int | None = None
        gc = t.gradient_checkpointing
        if gc and allow_checkpointing_change:
            need = partial_checkpointing_layers(shape, t, budget_bytes, cal)
            if need == 0:
                gc = False
            elif need < shape.num_layers:
                k = need
        t = dataclasses.replace(t, gradient_checkpointing=gc, checkpointed_layers=k)
        frac = 0.0 if not gc else (1.0 if k is None else k / shape.num_layers)
        cand = Layout(
            m,
            a,
            gc,
            k,
            peak,
            estimate(shape, t, cal),
            step_seconds(shape, lengths, effective_batch, a, frac),
        )
        if best is None or cand.step_s < best.step_s * 0.99:
            best = cand
    return best
