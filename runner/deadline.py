"""Telling a deadline's SIGTERM from a preemption's.

Kubernetes ends a pod with SIGTERM for several reasons, and the container is not told which:
the pod's ``DisruptionTarget`` condition (eviction, preemption, node drain) is visible to the
Job controller but not inside the container. What the runner *can* know is the Job's own
deadline: the rendered pod carries ``activeDeadlineSeconds`` in ``$QLORA_ACTIVE_DEADLINE_S``,
and the runner knows how long it has been running. A SIGTERM at or near that deadline is the
deadline (exit code 11, ``podFailurePolicy: FailJob``: the Job has failed anyway); any other
SIGTERM is attributed to eviction or preemption (exit code 7, ignored by the policy, and the
restarted pod resumes from the checkpoint).

The runner's clock starts with the process, after the pod was scheduled and its image pulled,
so it runs behind the Job's. The margin (:func:`deadline_margin_s`, up to 10 minutes) absorbs
that: a SIGTERM within it of the deadline is called the deadline. An eviction that close to the
deadline could not have finished on a restart either. A pod that is itself a retry starts its
clock late by the earlier pods' time; its deadline SIGTERM can then be reported as preemption
(the Job still fails by its deadline; the Job's own condition says ``DeadlineExceeded``).
"""

from __future__ import annotations

import os

DEADLINE_ENV = "QLORA_ACTIVE_DEADLINE_S"
"""The Job's ``activeDeadlineSeconds``, set in the rendered pod's environment."""
MAX_MARGIN_S = 600.0


def deadline_from_env(environ: dict[str, str] | None = None) -> float | None:
    """``$QLORA_ACTIVE_DEADLINE_S`` as seconds, or None when unset or not a positive number."""
    raw = (os.environ if environ is None else environ).get(DEADLINE_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value > 0 else None


def deadline_margin_s(deadline_s: float) -> float:
    """How early before the deadline a SIGTERM still counts as the deadline's."""
    return min(MAX_MARGIN_S, max(1.0, deadline_s / 10.0))


def is_deadline(elapsed_s: float, deadline_s: float | None) -> bool:
    """Whether a SIGTERM ``elapsed_s`` into the run is the Job's deadline."""
    return deadline_s is not None and elapsed_s >= deadline_s - deadline_margin_s(deadline_s)
