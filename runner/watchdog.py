"""A stuck phase is reported as stuck: every phase of ``qlora run`` has a time budget.

A run that hangs (a download that never finishes, a wedged device, a lock never released)
would otherwise wait for the Job's ``activeDeadlineSeconds`` (days) and then be reported as
the deadline. The :class:`Watchdog` is a daemon thread on the monotonic clock that is told
each phase as the run enters it (a recipe phase hook) and each optimizer step (a trainer
callback). Budgets are settings with generous defaults (:data:`BUDGET_SETTINGS`):

* loading, preflight, verifying, evaluating, publishing: the phase's wall time;
* training: *progress*, not wall time: no optimizer step for ``QLORA_TRAINING_STALL_S``
  (the first window also covers loading the model and the first step's compilation).

When a budget is used up the watchdog logs a structured error (``stuck: true``, the phase,
how long it ran, the budget and the setting that sets it), writes the termination message
and ends the process with exit code 13 (:class:`~runner.errors.StuckError`) by
``os._exit``: a stuck main thread cannot be trusted to unwind, so nothing after the hang
runs (no final metrics push). Exit 13 is not in the Job's ``FailJob`` or ``Ignore`` lists:
it counts against ``backoffLimit``, since a hang of storage or of one node's GPU may not
repeat on another pod. If even logging blocks, the process ends anyway after
:data:`EXIT_GRACE_S`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from runner import launch
from runner.errors import ExitCode, StuckError, missing_extra
from runner.settings import Settings
from runner.termination import failure_message, report
from runner.train import distributed

log = logging.getLogger("runner.watchdog")

BUDGET_SETTINGS: dict[str, str] = {
    "loading": "loading_budget_s",
    "preflight": "preflight_budget_s",
    "training": "training_stall_s",
    "verifying": "verifying_budget_s",
    "evaluating": "evaluating_budget_s",
    "publishing": "publishing_budget_s",
}
"""Phase -> the :class:`~runner.settings.Settings` field holding its budget in seconds."""
PROGRESS_PHASES = frozenset({"training"})
"""Phases whose budget runs from the last sign of progress (an optimizer step)."""
EXIT_GRACE_S = 10.0


def _exit(error: StuckError) -> None:
    """End the process now with the error's exit code (recorded for a torchrun group's parent,
    :mod:`runner.launch`; the log flushed first)."""
    launch.record_exit(distributed.current().rank, int(error.exit_code))
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(int(error.exit_code))


class Watchdog:
    """Ends the run when the current phase overruns its budget (see the module docstring).

    Args:
        budgets: Seconds per phase name; phases not named (succeeded, failed) stop it.
        on_expiry: Called once with the error after it is logged and reported
            (default: end the process with exit code 13).
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        budgets: Mapping[str, float],
        *,
        on_expiry: Callable[[StuckError], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budgets = dict(budgets)
        self.fired: StuckError | None = None
        self._on_expiry = on_expiry or _exit
        self._clock = clock
        self._lock = threading.Lock()
        self._phase: str | None = None
        self._since = self._last = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_s = min(1.0, max(0.005, min(self.budgets.values(), default=4.0) / 4))

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Watchdog:
        """A watchdog with the budgets of ``settings`` (``QLORA_*_BUDGET_S``, ``..._STALL_S``)."""
        return cls({p: float(getattr(settings, f)) for p, f in BUDGET_SETTINGS.items()}, **kwargs)

    def on_phase(self, phase: object) -> None:
        """A recipe phase hook: restart the clock for ``phase``; stop on a final phase."""
        name = str(getattr(phase, "value", phase))
        with self._lock:
            self._phase, self._since = name, self._clock()
            self._last = self._since
        if name not in self.budgets:
            self.stop()
        elif self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()

    def progress(self) -> None:
        """A sign of life (an optimizer step): restarts a progress phase's budget."""
        with self._lock:
            self._last = self._clock()

    def stop(self) -> None:
        """Watch no more (the run has ended)."""
        self._stop.set()

    def expired(self) -> StuckError | None:
        """The error if the current phase is over its budget now, else None."""
        found = self._check()
        return None if found is None else found[0]

    def _check(self) -> tuple[StuckError, dict[str, Any]] | None:
        with self._lock:
            phase, since, last = self._phase, self._since, self._last
        budget = self.budgets.get(phase or "")
        if phase is None or budget is None:
            return None
        now = self._clock()
        progress = phase in PROGRESS_PHASES
        idle = now - (last if progress else since)
        if idle < budget:
            return None
        setting = "QLORA_" + BUDGET_SETTINGS.get(phase, f"{phase}_budget_s").upper()
        what = f"no optimizer step for {idle:.1f} s" if progress else f"ran {idle:.1f} s"
        error = StuckError(
            f"stuck in {phase}: {what}, over its budget of {budget:g} s ({setting}); "
            "the watchdog ended the run. The last log lines show what it was waiting on; "
            f"if the phase is only slow, raise {setting}"
        )
        fields = {"phase": phase, "phase_s": round(now - since, 3), "budget_s": budget}
        return error, fields

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            found = self._check()
            if found is not None:
                self._fire(*found)
                return

    def _fire(self, error: StuckError, fields: dict[str, Any]) -> None:
        self.fired = error
        if self._on_expiry is _exit:  # logging itself may be what hangs
            timer = threading.Timer(EXIT_GRACE_S, os._exit, (int(ExitCode.STUCK),))
            timer.daemon = True
            timer.start()
        log.error(
            "%s",
            error.message,
            extra={"stuck": True, **fields, "exit_code": int(error.exit_code)},
        )
        if distributed.current().is_main:  # one termination message per pod (ranks share it)
            report(failure_message(error))
        self._on_expiry(error)


def make_watchdog_callback(watchdog: Watchdog) -> Any:
    """A ``transformers.TrainerCallback`` telling ``watchdog`` of every optimizer step."""
    try:
        from transformers import TrainerCallback
    except ImportError as e:
        raise missing_extra("transformers", "train") from e

    class WatchdogCallback(TrainerCallback):  # type: ignore[misc]
        """Each optimizer step (and the start of training) is progress."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            watchdog.progress()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            watchdog.progress()

    return WatchdogCallback()
