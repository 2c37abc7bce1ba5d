"""Surviving preemption: SIGTERM handling and the callback that checkpoints to object storage.

Kubernetes stops a pod (node drain, spot reclaim, Kueue preemption) with SIGTERM, then SIGKILL
after ``terminationGracePeriodSeconds``. The rendered Job sets that to
:data:`GRACE_PERIOD_S` (``runner.k8s.manifests.JobPolicy.termination_grace_s``; a test keeps
the two equal), which covers finishing the current optimizer step and committing one
checkpoint. What the runner does with the signal depends on where it is:

* **before training** (loading, preflight): nothing to save; :class:`PreemptedError` at once.
* **training**: the handler only sets a flag. At the end of the current optimizer step
  :class:`CheckpointCallback` asks the trainer to save, commits the checkpoint to storage
  (files first, manifest last) and raises :class:`PreemptedError`: exit code 7, which the
  Job's ``podFailurePolicy`` does not count as a failure, and the restarted pod resumes.
* **after training** (verify, publish): the final checkpoint is already committed, so the
  run stops at once with exit code 7 and the restart verifies and publishes from it.

The callback also checkpoints every ``training.checkpoint_every_steps`` optimizer steps, at
least every ``training.checkpoint_every_minutes``, and after the last step. A periodic
checkpoint that fails to upload is logged and training goes on (the publish at the end needs
the store anyway); a checkpoint asked for by SIGTERM that fails raises the
:class:`StorageError` (exit code 5) instead of claiming a checkpoint was written.

A SIGTERM at the Job's deadline is not preemption (:mod:`runner.deadline`): the same
checkpoint is written, but the run ends with :class:`DeadlineExceededError` (exit code 11),
which the Job's policy does not retry, and says how long it ran against which deadline.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from runner.checkpoints import CheckpointStore
from runner.deadline import deadline_from_env, is_deadline
from runner.errors import (
    DeadlineExceededError,
    PreemptedError,
    RunnerError,
    StorageError,
    VerificationError,
    missing_extra,
)

log = logging.getLogger(__name__)

GRACE_PERIOD_S = 300
"""Seconds between SIGTERM and SIGKILL that the runner is designed for (the Job's
``terminationGracePeriodSeconds``): the current step plus one checkpoint upload."""


class PreemptionGuard:
    """Turns SIGTERM into a flag while training and into :class:`PreemptedError` otherwise.

    Use as a context manager around the whole run; it installs its handler in the main thread
    (elsewhere it only offers the flag) and restores the previous handler on exit.

    Args:
        deadline_s: The Job's ``activeDeadlineSeconds`` (default: ``$QLORA_ACTIVE_DEADLINE_S``);
            a SIGTERM near it is the deadline, not preemption (:mod:`runner.deadline`).
    """

    def __init__(self, deadline_s: float | None = None) -> None:
        self.deadline_s = deadline_s if deadline_s is not None else deadline_from_env()
        self.started_at = time.monotonic()
        self.deadline_hit = False
        self._event = threading.Event()
        self._deferring = False
        self._previous: Any = None
        self._installed = False
        self.received_at: float | None = None
        self.where = "loading"

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    @property
    def preempted(self) -> bool:
        """Whether SIGTERM has arrived."""
        return self._event.is_set()

    def seconds_since_signal(self) -> float:
        """Seconds since SIGTERM arrived (0 if it has not)."""
        return 0.0 if self.received_at is None else time.monotonic() - self.received_at

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = not self._event.is_set()
        if first:
            self.received_at = time.monotonic()
            self.deadline_hit = is_deadline(self.received_at - self.started_at, self.deadline_s)
            self._event.set()
        if self._deferring or not first:
            if first:
                log.warning(
                    "SIGTERM (%s): checkpointing at the end of the current step, then exiting "
                    "(grace period %d s)",
                    "the job's deadline" if self.deadline_hit else "eviction or preemption",
                    GRACE_PERIOD_S,
                    extra={"preempted": not self.deadline_hit, "deadline": self.deadline_hit},
                )
            return
        raise self.error()

    def error(self, detail: str | None = None) -> RunnerError:
        """The error to stop with: the deadline's, else preemption's, naming where the run was.

        Args:
            detail: What was saved, e.g. ``at step 5/10; checkpoint committed to ...``;
                default: the phase the run was in.
        """
        where = detail or f"during {self.where}"
        if self.deadline_hit:
            ran = (self.received_at or time.monotonic()) - self.started_at
            return DeadlineExceededError(
                f"deadline exceeded (SIGTERM {ran:.0f} s into the run; the Job's "
                f"activeDeadlineSeconds is {self.deadline_s:.0f} s) {where}; not preemption. "
                "The deadline is 4x the planned runtime (at least 2 h): check why the run is "
                "slower than planned; a new job of the same spec resumes from the newest "
                "committed checkpoint"
            )
        return PreemptedError(
            f"preempted (SIGTERM) {where}; a restart resumes from the newest committed checkpoint"
        )

    def adopt(self) -> None:
        """Another rank received SIGTERM: stop at this step like it (DDP, see the callback)."""
        if not self._event.is_set():
            self.received_at = time.monotonic()
            self._event.set()
            log.warning(
                "another rank received SIGTERM: checkpointing at the end of this step, then "
                "exiting",
                extra={"preempted": True},
            )

    def on_phase(self, phase: object) -> None:
        """A recipe phase hook: remember where the run is, for the message."""
        self.where = str(getattr(phase, "value", phase))

    @contextmanager
    def training(self) -> Iterator[None]:
        """While inside, SIGTERM only sets the flag; :class:`CheckpointCallback` acts on it.

        On leaving (training over, final checkpoint committed) a pending SIGTERM stops the run.
        """
        self.where, self._deferring = "training", True
        try:
            yield
        finally:
            self._deferring = False
        self.where = "verification and publishing"
        self.check()

    def check(self) -> None:
        """Raise :class:`PreemptedError` if SIGTERM has arrived."""
        if self.preempted:
            raise self.error()


class CheckpointObserver(Protocol):
    """Told about every checkpoint (``runner.metrics.RunMetrics`` is one)."""

    def checkpoint_committed(self, step: int) -> None:
        """A checkpoint of ``step`` is committed to storage."""
        ...

    def checkpoint_failed(self) -> None:
        """A checkpoint could not be committed."""
        ...


def make_checkpoint_callback(
    checkpoints: CheckpointStore,
    guard: PreemptionGuard,
    *,
    every_steps: int | None,
    every_minutes: float | None,
    observer: CheckpointObserver | None = None,
) -> Any:
    """A ``transformers.TrainerCallback`` that checkpoints to ``checkpoints`` (see the module).

    Args:
        checkpoints: Where the job's checkpoints go.
        guard: The run's SIGTERM guard.
        every_steps: ``training.checkpoint_every_steps``.
        every_minutes: ``training.checkpoint_every_minutes``.
        observer: Told about each commit and failure (metrics).
    """
    try:
        from transformers import TrainerCallback
    except ImportError as e:
        raise missing_extra("transformers", "train") from e

    from runner.train import distributed

    is_main = distributed.current().is_main

    class CheckpointCallback(TrainerCallback):  # type: ignore[misc]
        """Saves on schedule, after the last step and on SIGTERM; uploads every save."""

        def __init__(self) -> None:
            self.last_save = time.monotonic()
            self.committed_steps: list[int] = []
            self.failed_steps: list[int] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last_save = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            step = int(state.global_step)
            due_steps = bool(every_steps) and step % int(every_steps or 1) == 0
            due_time = (
                every_minutes is not None
                and time.monotonic() - self.last_save >= every_minutes * 60.0
            )
            last = step >= int(state.max_steps or 0)
            # Every rank stops at the same step when any of them got SIGTERM (one all-reduce
            # of a flag per optimizer step; nothing on a single process).
            if distributed.any_rank(guard.preempted) and not guard.preempted:
                guard.adopt()
            # The time-based schedule is rank 0's clock: every rank must save at the same step.
            due_time = bool(distributed.broadcast(due_time))
            if guard.preempted or due_steps or due_time or last:
                control.should_save = True
            if guard.preempted:
                control.should_training_stop = True
            return control

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step = int(state.global_step)
            local = Path(args.output_dir) / f"checkpoint-{step}"
            self.last_save = time.monotonic()
            if not is_main:
                # Rank 0 holds the whole state (LoRA weights, optimizer, schedule) and commits
                # it once; the others wait for that commit before exiting on SIGTERM.
                if guard.preempted:
                    distributed.barrier()
                    raise PreemptedError(
                        f"preempted (SIGTERM) at step {step}/{int(state.max_steps or 0)}; "
                        "rank 0 committed the checkpoint"
                    )
                return
            try:
                checkpoints.save(local, step, {"max_steps": int(state.max_steps or 0)})
            except (StorageError, VerificationError) as e:
                self.failed_steps.append(step)
                if observer is not None:
                    observer.checkpoint_failed()
                if guard.preempted:
                    raise
                log.error(
                    "checkpoint step %d not committed (training goes on): %s",
                    step,
                    e.message,
                    extra={"checkpoint_step": step},
                )
            else:
                self.committed_steps.append(step)
                if observer is not None:
                    observer.checkpoint_committed(step)
                _drop_older(Path(args.output_dir), step)
            if guard.preempted:
                distributed.barrier()
                waited = guard.seconds_since_signal()
                log.warning(
                    "checkpoint step %d committed %.1f s after SIGTERM; exiting",
                    step,
                    waited,
                    extra={"checkpoint_step": step, "preempted": True},
                )
                raise guard.error(
                    f"at step {step}/{int(state.max_steps or 0)}; "
                    f"checkpoint committed to {checkpoints.step_uri(step)} "
                    f"{waited:.0f} s after the signal"
                )

    return CheckpointCallback()


def checkpoint_is_final(checkpoint_dir: Path) -> bool:
    """Whether a trainer checkpoint was taken after the last step (nothing left to train).

    Reads ``trainer_state.json`` (``global_step`` and ``max_steps``); False if unreadable.
    """
    try:
        state = json.loads((checkpoint_dir / "trainer_state.json").read_text(encoding="utf-8"))
        return int(state["global_step"]) >= int(state["max_steps"]) > 0
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _drop_older(output_dir: Path, keep_step: int) -> None:
    """Remove local ``checkpoint-<N>`` folders other than ``keep_step`` (they are in storage)."""
    for child in output_dir.glob("checkpoint-*"):
        if child.is_dir() and child.name != f"checkpoint-{keep_step}":
            shutil.rmtree(child, ignore_errors=True)
