"""A rough wall-time estimate: dataset size x FLOPs per token / an assumed utilisation.

Users ask "how long, roughly?" before they ask anything else, so the plan answers, and says
what it assumed: the dataset size (counted only when the data is a local file; objects in
storage are not downloaded to plan), ~4 bytes of JSON per token, the class's slowest common
card, and a hardware FLOP utilisation taken from published QLoRA runs (see
``runner/plan/VRAM.md``). It is an order of magnitude, not a promise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from runner.plan.shapes import ModelShape
from runner.plan.types import GpuClass
from runner.spec import JobSpec

BYTES_PER_TOKEN = 4.0
"""JSON bytes per token: English text is ~4 characters per token; keys add some slack."""

HARDWARE_FLOP_UTILISATION = {"unsloth": 0.40, "transformers": 0.33}
"""Share of the card's dense BF16 peak reached, counting recomputed FLOPs (6N + attention per
token). Measured on one H200 (bench/speed/run1, Llama-3.1-8B shape, 2048 x 4): Unsloth (bare and
``qlora run``) 49 % in steady state and 37 % over the whole run including compilation;
transformers 37 % and 35 %. Published LLaMA-2-7B QLoRA runs on an A100 at seq 2048 reach 43 %
and 37 % (see VRAM.md). Padding and short rows waste some of it, so this sits in between."""

STARTUP_S = 300.0
"""Model download/load, tokenisation and the first compiled step."""


@dataclass(frozen=True)
class DatasetSize:
    """What was counted in the local dataset files.

    Attributes:
        rows: Training rows (after max_samples and the eval split).
        tokens_per_row: Mean estimated tokens per row, capped at max_seq_length.
    """

    rows: int
    tokens_per_row: float


def count_local_dataset(spec: JobSpec) -> DatasetSize | None:
    """Count rows and bytes of local JSON Lines / JSON sources; None if any is not local."""
    ds = spec.spec.dataset
    rows = 0
    size = 0
    for src in ds.sources:
        if "://" in src:
            return None
        path = Path(src)
        try:
            if path.suffix in (".jsonl", ".ndjson"):
                with path.open("rb") as fh:
                    for line in fh:
                        if line.strip():
                            rows += 1
                            size += len(line)
            elif path.suffix == ".json":
                data = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(data, list):
                    return None
                rows += len(data)
                size += path.stat().st_size
            else:
                return None
        except (OSError, ValueError, RecursionError):
            return None
    if ds.max_samples is not None and rows > ds.max_samples:
        size = int(size * ds.max_samples / rows)
        rows = ds.max_samples
    train_rows = rows - int(rows * ds.eval_fraction)
    if train_rows <= 0:
        return None
    per_row = min(size / rows / BYTES_PER_TOKEN, float(spec.spec.training.max_seq_length))
    return DatasetSize(train_rows, per_row)


def flops_per_token(shape: ModelShape, seq_len: float, gradient_checkpointing: bool) -> float:
    """Hardware FLOPs per trained token (frozen base: forward + activation gradients)."""
    passes = 6 if gradient_checkpointing else 4
    attention = (8 if gradient_checkpointing else 6) * shape.num_layers * seq_len * shape.q_dim
    return passes * shape.matmul_params + attention


@dataclass(frozen=True)
class RuntimeEstimate:
    """Throughput and wall time.

    Attributes:
        tokens_per_second: Assumed throughput.
        seconds: Estimated wall time, or None when the dataset size is unknown.
        note: What was assumed.
    """

    tokens_per_second: float | None
    seconds: float | None
    note: str


def estimate_runtime(
    spec: JobSpec,
    shape: ModelShape,
    gpu_class: GpuClass,
    backend: str,
    effective_batch: int,
    *,
    world_size: int = 1,
    allreduce_s: float = 0.0,
) -> RuntimeEstimate:
    """Estimate throughput and wall time for the planned job.

    With ``world_size`` ranks the compute of a step is shared and ``allreduce_s`` (the LoRA
    gradients' all-reduce, once per optimizer step) is added to every step.
    """
    tr = spec.spec.training
    if gpu_class.peak_bf16_tflops <= 0:
        return RuntimeEstimate(None, None, f"no peak FLOP/s known for class {gpu_class.name}")
    size = count_local_dataset(spec)
    avg = size.tokens_per_row if size and not tr.packing else float(tr.max_seq_length)
    hfu = HARDWARE_FLOP_UTILISATION[backend]
    tps = (
        hfu
        * gpu_class.peak_bf16_tflops
        * 1e12
        / flops_per_token(shape, avg, tr.gradient_checkpointing)
    )
    assumption = (
        f"{tps:,.0f} tokens/s assumed: {hfu:.0%} of {gpu_class.reference_card or gpu_class.name}"
        f"'s {gpu_class.peak_bf16_tflops:g} BF16 TFLOP/s"
    )
    if world_size > 1:
        assumption += f" per GPU, x {world_size} GPUs"
    if tr.max_steps is not None:
        steps = tr.max_steps
        tokens = tr.max_steps * effective_batch * avg
        what = f"{tr.max_steps} steps"
    elif size is None:
        return RuntimeEstimate(tps, None, f"{assumption}; dataset size unknown (not local)")
    else:
        seqs = size.rows
        if tr.packing:
            seqs = math.ceil(size.rows * size.tokens_per_row / tr.max_seq_length)
        steps = math.ceil(seqs * tr.epochs / effective_batch)
        tokens = steps * effective_batch * avg
        what = f"{size.rows} rows, ~{size.tokens_per_row:.0f} tokens each, {steps} steps"
    compute = tokens / (tps * world_size)
    comm = steps * allreduce_s
    seconds = STARTUP_S + compute + comm
    if world_size > 1:
        share = comm / (compute + comm) if compute + comm > 0 else 0.0
        what += (
            f"; all-reduce of the LoRA gradients {allreduce_s * 1e3:.1f} ms per step "
            f"({share:.1%} of the step)"
        )
    return RuntimeEstimate(
        tps * world_size * (compute / (compute + comm) if compute + comm > 0 else 1.0),
        seconds,
        f"{assumption}; {what}; +{STARTUP_S:.0f} s start-up",
    )
