"""The rendered ``podFailurePolicy``, applied by the operator where the API server lacks it.

A Job's ``podFailurePolicy`` fails it at once when the trainer exits with a code a retry
cannot fix (:data:`runner.k8s.manifests.FAIL_JOB_EXIT_CODES`: bad spec or data, does not fit,
verification, out of memory, missing extra). API servers before 1.26 (1.25 without the
feature gate) drop the field silently, and the Job controller would run the same failing pod
``backoffLimit`` more times. The operator reads the exit code of the Job's failed pod itself:
:func:`policy_failure` reports the Job as failed, and :func:`stop_job` ends it by setting
``activeDeadlineSeconds`` to 1 s, so the Job controller fails it (``DeadlineExceeded``) and
creates no more pods; the failed pod and its log stay for ``kubectl logs``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from runner.k8s.api import JOBS, KubeApi
from runner.k8s.manifests import FAIL_JOB_EXIT_CODES
from runner.k8s.status import FAILED, Progress, container_termination

POLICY_REASON = "PodFailurePolicy"


def _finished(job: Mapping[str, Any]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


def policy_failure(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> Progress | None:
    """A Failed progress when a pod of the still unfinished ``job`` exited with a code the
    rendered policy fails the Job on; None otherwise (the Job's own status decides)."""
    if _finished(job):
        return None
    codes = {int(c) for c in FAIL_JOB_EXIT_CODES}
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp", "")))
    for pod in reversed(failed):
        term = container_termination(pod)
        if term is None or term.exit_code not in codes:
            continue
        return Progress(
            phase=FAILED,
            reason=POLICY_REASON,
            message=term.reason or f"exit code {term.exit_code}",
            exit_code=term.exit_code,
            pod_name=str(pod["metadata"]["name"]),
            node_name=(pod.get("spec") or {}).get("nodeName"),
        )
    return None


def stop_job(api: KubeApi, namespace: str, name: str) -> bool:
    """Make the Job controller fail the Job now and start no more pods; False if it is gone,
    finished or changed meanwhile (the next reconcile sees it again)."""
    live = api.get(JOBS, namespace, name)
    if live is None or _finished(live):
        return False
    # A merge patch of one field (the operator's RBAC has patch on Jobs, not update), not
    # guarded by resourceVersion: the Job's status moves with every pod, and a 409 here would
    # leave it running, since the FineTuneJob is already Failed and not reconciled again.
    api.patch(JOBS, namespace, name, {"spec": {"activeDeadlineSeconds": 1}})
    return True
