"""Where ``qlora run`` leaves its outcome for Kubernetes: the termination message.

Kubernetes copies the file named by the container's ``terminationMessagePath``
(``/dev/termination-log`` in the rendered Job) into the pod status when the container ends.
The operator and ``qlora submit --wait`` read it (format: :mod:`runner.k8s.status`) to show
*why* a run failed and to re-plan after an out-of-memory exit. This module decides where to
write it and what, so the format stays in one place:

* ``$QLORA_TERMINATION_LOG`` if set (tests, other runtimes);
* else ``/dev/termination-log`` only inside a pod (``$KUBERNETES_SERVICE_HOST`` is set), so
  a run on a laptop never writes into ``/dev``.

The reason is one line, redacted like every log line. A failure to write is logged and
never changes the exit code.
"""

from __future__ import annotations

import logging
import os

from runner.errors import ExitCode, RunnerError
from runner.k8s.status import TERMINATION_LOG, termination_message, write_termination_message
from runner.logs import redact

log = logging.getLogger(__name__)

ENV_PATH = "QLORA_TERMINATION_LOG"


def termination_log_path() -> str | None:
    """The file to write, or None outside a pod when nothing asks for one."""
    explicit = os.environ.get(ENV_PATH)
    if explicit:
        return explicit
    return TERMINATION_LOG if os.environ.get("KUBERNETES_SERVICE_HOST") else None


def failure_message(error: BaseException) -> str:
    """The termination line for an error: its message and exit code (1 for a bug)."""
    if isinstance(error, RunnerError):
        reason, code = error.message or type(error).__name__, int(error.exit_code)
    elif isinstance(error, KeyboardInterrupt):
        reason, code = "interrupted", int(ExitCode.INTERRUPTED)
    else:
        reason, code = f"internal error: {type(error).__name__}: {error}", int(ExitCode.INTERNAL)
    return termination_message(succeeded=False, reason=redact(reason), exit_code=code)


def success_message(adapter_uri: str, evaluation: str | None = None) -> str:
    """The termination line for a published adapter (with the evaluation's numbers)."""
    return termination_message(succeeded=True, adapter_uri=adapter_uri, evaluation=evaluation)


def report(message: str) -> bool:
    """Write ``message`` where Kubernetes reads it (see the module docstring).

    Returns:
        True if it was written.
    """
    path = termination_log_path()
    if path is None:
        return False
    try:
        written = write_termination_message(message, path)
    except OSError as e:
        log.warning("could not write the termination message to %s: %s", path, e)
        return False
    if not written:
        log.warning("could not write the termination message: %s has no directory", path)
    return written
