"""The project's error tree and its exit codes.

Every failure a user can cause or meet is one of these types. Adapters (storage, Kubernetes,
training) translate third-party exceptions into them at the boundary, carrying coordinates
such as ``s3://bucket/key`` or ``namespace/name``. The CLI turns them into ``path: message``
lines and a documented exit code; nothing reaches the user as a traceback.

The exit codes are a contract: the rendered Job's ``podFailurePolicy`` maps them (invalid
input is never retried, preemption does not count against the backoff limit), and the
submitter and operator read them back to decide whether to re-plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum


class ExitCode(IntEnum):
    """Documented process exit codes of every ``qlora`` command (see README, "Exit codes")."""

    OK = 0
    INTERNAL = 1
    """An unexpected error: a bug in qlora-runner. Retried by the Job's backoff limit."""
    INVALID_INPUT = 2
    """The spec or the dataset is invalid. Never retried (``podFailurePolicy: FailJob``)."""
    DOES_NOT_FIT = 3
    """The plan fits no GPU class (or not the class asked for)."""
    VERIFICATION_FAILED = 4
    """The trained adapter, or a published one, failed verification. Nothing was published."""
    STORAGE = 5
    """Object storage was unreachable or denied access after bounded retries."""
    CUDA_OOM = 6
    """The GPU ran out of memory. The submitter and operator re-plan with a smaller micro batch."""
    PREEMPTED = 7
    """SIGTERM arrived; a checkpoint was written and a restart resumes from it."""
    KUBERNETES = 8
    """The Kubernetes API refused or could not be reached (submitter and operator)."""
    JOB_FAILED = 9
    """``qlora submit --wait``: the submitted job ended in failure (reason printed)."""
    MISSING_DEPENDENCY = 10
    """An optional extra (e.g. ``qlora-runner[train]``) is not installed."""
    DEADLINE_EXCEEDED = 11
    """SIGTERM when the Job's ``activeDeadlineSeconds`` is used up (not preemption); a
    checkpoint was written if training had begun. Not retried (``podFailurePolicy: FailJob``)."""
    INTERRUPTED = 130
    """Stopped by Ctrl-C in an interactive command."""


class RunnerError(Exception):
    """Base of every error qlora-runner raises on purpose.

    Args:
        message: One line a user can act on; it should name the fix.
        details: Further ``path: message`` lines (e.g. every invalid field of a spec).
    """

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details: tuple[str, ...] = tuple(details)

    def lines(self) -> list[str]:
        """All lines to show the user: the message, then each detail."""
        return [self.message, *self.details] if self.message else list(self.details)


class SpecError(RunnerError):
    """The job spec is invalid; ``details`` holds one ``path: message`` line per problem."""

    exit_code = ExitCode.INVALID_INPUT


class DataError(RunnerError):
    """The dataset is empty, malformed, or leaves (almost) no tokens that carry loss."""

    exit_code = ExitCode.INVALID_INPUT


class PlanError(RunnerError):
    """The planner cannot place the job: it fits no GPU class, or not the one asked for."""

    exit_code = ExitCode.DOES_NOT_FIT


class VerificationError(RunnerError):
    """An adapter did not change in training, is non-finite, or a published file is corrupt."""

    exit_code = ExitCode.VERIFICATION_FAILED


class StorageError(RunnerError):
    """Object storage is unreachable, denied access, or an object is missing."""

    exit_code = ExitCode.STORAGE


class OutOfMemoryError(RunnerError):
    """CUDA ran out of memory during training."""

    exit_code = ExitCode.CUDA_OOM


class PreemptedError(RunnerError):
    """The run was asked to stop (SIGTERM) and wrote a checkpoint first."""

    exit_code = ExitCode.PREEMPTED


class DeadlineExceededError(RunnerError):
    """SIGTERM arrived when the Job's deadline was used up: the run took longer than allowed."""

    exit_code = ExitCode.DEADLINE_EXCEEDED


class KubernetesError(RunnerError):
    """The Kubernetes API refused a request or could not be reached."""

    exit_code = ExitCode.KUBERNETES


class SubmitError(KubernetesError):
    """A submitted job could not be created, watched or cancelled."""


class JobFailedError(RunnerError):
    """A submitted job ended in failure; the message carries the pod's termination reason."""

    exit_code = ExitCode.JOB_FAILED


class MissingDependencyError(RunnerError):
    """An optional extra is needed; the message says which ``pip install`` fixes it."""

    exit_code = ExitCode.MISSING_DEPENDENCY


def missing_extra(module: str, extra: str) -> MissingDependencyError:
    """Build the error for an optional dependency that is not installed.

    Args:
        module: The module that failed to import.
        extra: The qlora-runner extra that provides it.

    Returns:
        An error whose message names the install command.
    """
    return MissingDependencyError(
        f"{module} is not installed; install it with: pip install 'qlora-runner[{extra}]'"
    )
