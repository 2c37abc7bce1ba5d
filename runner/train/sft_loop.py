"""What both backends do around ``SFTTrainer.train()``: resume, evaluate, report, save.

The backends differ in how they load and patch the model and build the trainer; once a
trainer exists, running it and turning its state into a :class:`TrainOutcome` is the same
code, kept here so a fix to resume or reporting reaches both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner.train.backend import ModelSession, TokenizedExample, TrainOutcome
from runner.train.preemption import checkpoint_is_final


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


def save_adapter_files(session: ModelSession, dest: Path) -> list[Path]:
    """Write the adapter (plain peft format) and the tokenizer files into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    session.model.save_pretrained(str(dest), safe_serialization=True)
    session.tokenizer.save_pretrained(str(dest))
    return sorted(p for p in dest.rglob("*") if p.is_file())
