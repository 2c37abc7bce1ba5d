"""What both backends do around ``SFTTrainer.train()``: resume, evaluate, report, save.

The backends differ in how they load and patch the model and build the trainer; once a
trainer exists, running it and turning its state into a :class:`TrainOutcome` is the same
code, kept here so a fix to resume or reporting reaches both.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner.train.backend import BatchShape, ModelSession, TokenizedExample, TrainOutcome
from runner.train.ordering import order_rows
from runner.train.preemption import checkpoint_is_final

log = logging.getLogger(__name__)


def sft_args(
    shape: BatchShape, output_dir: Path, *, optim: str, bf16: bool, fp16: bool
) -> dict[str, Any]:
    """The ``SFTConfig`` keyword arguments both backends share, from the planned batch shape.

    Args:
        shape: Batch shape and schedule.
        output_dir: The trainer's scratch directory (checkpoints are committed from there).
        optim: The optimizer the backend can actually run (the CPU cannot run 8-bit AdamW).
        bf16: Train in bfloat16 autocast.
        fp16: Train in float16 autocast.
    """
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": shape.micro_batch_size,
        "per_device_eval_batch_size": shape.micro_batch_size,
        "gradient_accumulation_steps": shape.gradient_accumulation_steps,
        "num_train_epochs": _trainer_epochs(shape),
        "max_steps": shape.max_steps if shape.max_steps is not None else -1,
        "learning_rate": shape.learning_rate,
        "lr_scheduler_type": shape.lr_scheduler,
        "warmup_steps": shape.warmup_ratio,  # transformers 5: a value below 1 is a ratio
        "weight_decay": shape.weight_decay,
        "max_grad_norm": shape.max_grad_norm,
        "optim": optim,
        "seed": shape.seed,
        "data_seed": shape.seed,
        "gradient_checkpointing": shape.gradient_checkpointing,
        "logging_steps": shape.logging_steps,
        "save_strategy": "steps" if shape.checkpoint_every_steps else "no",
        "save_steps": shape.checkpoint_every_steps or 500,
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "bf16": bf16,
        "fp16": fp16,
        "max_length": shape.max_seq_length,
        "completion_only_loss": shape.completion_only_loss,
        "packing": shape.packing,
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_num_workers": 0,
        "train_sampling_strategy": "sequential" if _is_ordered(shape) else "random",
        **ddp_args(),
    }


DDP_TIMEOUT_ENV = "QLORA_DDP_TIMEOUT_S"


def ddp_args() -> dict[str, Any]:
    """What data parallelism needs from the trainer (harmless on one process).

    Non-reentrant checkpointing (the reentrant one runs backward hooks twice under DDP and
    breaks with frozen inputs), no search for unused parameters (every LoRA weight gets a
    gradient every step; the search costs a graph walk per step), and the collective timeout
    the process group was opened with.
    """
    return {
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "ddp_find_unused_parameters": False,
        "ddp_timeout": int(os.environ.get(DDP_TIMEOUT_ENV, "900")),
    }


def _is_ordered(shape: BatchShape) -> bool:
    return shape.ordered and not shape.packing


def _trainer_epochs(shape: BatchShape) -> float:
    # The ordered rows hold ceil(epochs) passes (runner.train.ordering).
    return shape.epochs / math.ceil(shape.epochs) if _is_ordered(shape) else shape.epochs


def to_dataset(
    dataset_cls: Any, examples: Sequence[TokenizedExample], *, completion_only_loss: bool
) -> Any:
    """Pre-tokenized rows as a ``datasets.Dataset`` with the columns TRL reads.

    The ``completion_mask`` column goes along only when the loss is completion-only: TRL
    ignores it otherwise, and a row of plain ``input_ids`` is exactly what a hand-written
    script hands to the trainer.
    """
    columns: dict[str, Any] = {"input_ids": [list(e.input_ids) for e in examples]}
    if completion_only_loss:
        columns["completion_mask"] = [list(e.completion_mask) for e in examples]
    return dataset_cls.from_dict(columns)


def trainer_datasets(
    dataset_cls: Any,
    train: Sequence[TokenizedExample],
    eval_data: Sequence[TokenizedExample] | None,
    shape: BatchShape,
    *,
    padding_free: bool = False,
) -> tuple[Any, Any]:
    """The ``train_dataset`` and ``eval_dataset`` (None without held-out rows) for TRL.

    With ``shape.ordered`` the training rows are laid out in the plan's order (balanced token
    counts per micro batch when ``padding_free``, else grouped by length) and the trainer
    reads them sequentially (:mod:`runner.train.ordering`).
    """

    def make(rows: Sequence[TokenizedExample]) -> Any:
        return to_dataset(dataset_cls, rows, completion_only_loss=shape.completion_only_loss)

    rows = train
    if _is_ordered(shape):
        laid = order_rows(
            train,
            shape.micro_batch_size,
            shape.gradient_accumulation_steps,
            seed=shape.seed,
            epochs=shape.epochs,
            padding_free=padding_free,
        )
        rows = laid.examples
        log.info(
            "row order: %d micro batches, largest %d tokens (%s)",
            laid.micro_batches,
            laid.peak_tokens,
            "balanced token counts, padding-free" if padding_free else "grouped by length",
            extra={"peak_micro_batch_tokens": laid.peak_tokens},
        )
    return make(rows), make(eval_data) if eval_data else None


def run_trainer(
    trainer: Any,
    eval_data: Sequence[TokenizedExample] | None,
    resume_from: Path | None,
    optimizer: str,
) -> TrainOutcome:
    """Train (or resume), evaluate if there is held-out data, and report.

    Args:
        trainer: A built TRL ``SFTTrainer``.
        eval_data: Held-out rows, or None.
        resume_from: A restored checkpoint directory, or None.
        optimizer: The optimizer actually used (for the manifest).
    """
    started = time.monotonic()
    if resume_from is not None:
        _keep_trainable_dtypes_on_load(trainer)
    if resume_from is not None and checkpoint_is_final(resume_from):
        # Nothing left to train: transformers would still run one more step (its epoch loop
        # checks max_steps only after a step), so load the weights and state instead.
        from transformers import TrainerState

        trainer._load_from_checkpoint(str(resume_from))
        trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    runtime = time.monotonic() - started
    eval_loss: float | None = None
    if eval_data:
        value = trainer.evaluate().get("eval_loss")
        eval_loss = float(value) if value is not None and math.isfinite(value) else None
    losses = tuple(float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
    return TrainOutcome(
        steps=int(trainer.state.global_step),
        losses=losses,
        runtime_s=runtime,
        train_tokens=int(trainer.state.num_input_tokens_seen or 0),
        eval_loss=eval_loss,
        optimizer=optimizer,
    )


def _keep_trainable_dtypes_on_load(trainer: Any) -> None:
    """Make the trainer's checkpoint load leave the trainable weights in their dtype.

    A resumed run loads the checkpoint's adapter with ``PeftModel.load_adapter``, whose
    default ``autocast_adapter_dtype=True`` upcasts bfloat16/float16 LoRA weights to
    float32. A fresh run trains them in the dtype the trainer set when it was built (TRL's
    ``SFTTrainer`` casts the LoRA weights of a 4-bit model to bfloat16, as in the QLoRA
    paper), so without this the steps after a resume would run in another dtype than the
    same steps of an uninterrupted run, and the published adapter would be float32 instead
    of bfloat16. The cast back happens inside the load, before the trainer builds its
    optimizer, so the optimizer and its restored state see the same parameters (and dtypes)
    as in the run that wrote the checkpoint.
    """
    load = trainer._load_from_checkpoint
    model = trainer.model

    def load_keeping_dtypes(resume_from_checkpoint: str, *args: Any, **kwargs: Any) -> Any:
        dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
        result = load(resume_from_checkpoint, *args, **kwargs)
        for name, param in model.named_parameters():
            wanted = dtypes.get(name)
            if wanted is not None and param.dtype != wanted:
                param.data = param.data.to(wanted)
        return result

    trainer._load_from_checkpoint = load_keeping_dtypes


def save_adapter_files(session: ModelSession, dest: Path) -> list[Path]:
    """Write the adapter (plain peft format) and the tokenizer files into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    session.model.save_pretrained(str(dest), safe_serialization=True)
    session.tokenizer.save_pretrained(str(dest))
    return sorted(p for p in dest.rglob("*") if p.is_file())
