"""Fault injection for tests of the whole path (real pods, the operator's re-plan).

``QLORA_FAULT_OOM_AT_STEP=N`` (:attr:`runner.settings.Settings.fault_oom_at_step`) raises
PyTorch's own out-of-memory error at the end of optimizer step ``N`` of attempt 0, before that
step's checkpoint, exactly where a plan too large for the GPU fails. The run turns it into exit
6 (:mod:`runner.train.oom`) like a real one, the operator re-plans, and the next attempt
(``QLORA_ATTEMPT`` 1) trains on from the last committed checkpoint without the fault. Off (0)
by default; nothing is registered then.

``QLORA_FAULT_STEP_DELAY_S=S`` (:attr:`runner.settings.Settings.fault_step_delay_s`) sleeps
``S`` seconds after every optimizer step of every attempt, as a slow node would: a test that
signals a pod "mid-training" then cannot be outrun by a tiny model on an idle machine. Off (0)
by default.
"""

from __future__ import annotations

import time
from typing import Any

from runner.errors import missing_extra
from runner.settings import Settings


def make_fault_callbacks(settings: Settings) -> list[Any]:
    """The ``transformers.TrainerCallback`` objects that inject the configured faults."""
    step = settings.fault_oom_at_step
    delay_s = settings.fault_step_delay_s
    oom = bool(step) and settings.attempt == 0
    if not oom and not delay_s:
        return []
    try:
        import torch
        from transformers import TrainerCallback
    except ImportError as e:
        raise missing_extra("transformers", "train") from e

    class SlowSteps(TrainerCallback):  # type: ignore[misc]
        """Sleeps ``delay_s`` after every optimizer step."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            time.sleep(delay_s)

    class InjectedOutOfMemory(TrainerCallback):  # type: ignore[misc]
        """Raises ``torch.OutOfMemoryError`` when ``global_step`` reaches the setting."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if int(state.global_step) == step:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory (injected by QLORA_FAULT_OOM_AT_STEP={step})")

    return ([InjectedOutOfMemory()] if oom else []) + ([SlowSteps()] if delay_s else [])
