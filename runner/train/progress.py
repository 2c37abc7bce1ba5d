"""Structured progress logs from inside ``trainer.train()``.

The trainer's own printer writes Python dicts to stdout; pods need one JSON log record per
logging step with the step, loss, learning rate and an ETA, and a terminal wants one short
line. This callback reads only the plain numbers the trainer already logged (no tensors).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from runner.errors import missing_extra

log = logging.getLogger("runner.train")


def make_progress_callback() -> Any:
    """A ``transformers.TrainerCallback`` that logs progress as structured records."""
    try:
        from transformers import TrainerCallback
    except ImportError as e:
        raise missing_extra("transformers", "train") from e

    class ProgressCallback(TrainerCallback):  # type: ignore[misc]
        """Logs ``step N/M loss=… lr=… eta=…s`` at every logging step."""

        def __init__(self) -> None:
            self.started = time.monotonic()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.monotonic()
            log.info("training started: %d optimizer steps", state.max_steps)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if not logs or "loss" not in logs:
                return
            step, total = int(state.global_step), int(state.max_steps or 0)
            elapsed = time.monotonic() - self.started
            eta = elapsed / step * (total - step) if step and total else math.nan
            loss = float(logs["loss"])
            lr = float(logs.get("learning_rate", math.nan))
            log.info(
                "step %d/%d loss=%.4f lr=%.3g eta=%.0fs",
                step,
                total,
                loss,
                lr,
                eta,
                extra={
                    "step": step,
                    "max_steps": total,
                    "loss": loss,
                    "learning_rate": lr,
                    "grad_norm": _float(logs.get("grad_norm")),
                    "tokens_seen": int(state.num_input_tokens_seen or 0),
                    "eta_s": None if math.isnan(eta) else round(eta, 1),
                },
            )

    return ProgressCallback()


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
