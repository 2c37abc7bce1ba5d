"""How a finished pod tells the outside world what happened, and how we read Job progress.

Pure functions over plain Kubernetes dicts, shared by ``qlora submit --wait``, ``qlora status``
and the operator, so that all three describe a job the same way.

The termination message (the contract between ``qlora run`` and its watchers)
------------------------------------------------------------------------------
When ``qlora run`` ends it writes ONE JSON object on one line to ``/dev/termination-log`` (the
container's ``terminationMessagePath``; Kubernetes keeps at most 4096 bytes of it)::

    {"status": "succeeded", "adapter_uri": "s3://adapters/bot/runs/20261128-0942-ab12cd"}
    {"status": "failed", "reason": "CUDA out of memory at step 12", "exit_code": 6}

``status`` is ``succeeded`` or ``failed``; ``adapter_uri`` is the published run's URI (only on
success); ``reason`` is one human line; ``exit_code`` is the :class:`runner.errors.ExitCode`
the process exits with. Extra keys are allowed and ignored. :func:`termination_message` builds
the line and :func:`write_termination_message` writes it. If the file holds something else
(the Job uses ``terminationMessagePolicy: FallbackToLogsOnError``, so a crash leaves the last
log lines there), :func:`parse_termination_message` keeps its last non-empty line as the reason
and takes the exit code from the container status.

FineTuneJob status (written by the operator; the CRD's status schema, ``runner.k8s.crd``)
------------------------------------------------------------------------------------------
``phase`` (Pending | Planned | Running | Succeeded | Failed), ``observedGeneration``,
``specHash``, ``gpuClass``, ``vramEstimate`` (``"17.4 GiB"``), ``vramEstimateBytes``,
``quantMode``, ``backend``, ``jobName``, ``configMapName``, ``adapterURI``, ``retries`` (0 for
the first try, +1 per out-of-memory re-plan), ``startTime``, ``completionTime``, ``reason``,
``message``, and ``conditions``: ``{type, status, reason, message, lastTransitionTime,
observedGeneration}`` with types ``Planned``, ``Running``, ``Succeeded``, ``Failed``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from runner.k8s import names

TERMINATION_LOG = "/dev/termination-log"
MAX_TERMINATION_BYTES = 4096

PENDING = "Pending"
PLANNED = "Planned"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
CONDITION_TYPES = (PLANNED, RUNNING, SUCCEEDED, FAILED)


@dataclass(frozen=True)
class Termination:
    """What a finished container reported.

    Attributes:
        succeeded: The runner reported success (or the container exited 0).
        adapter_uri: URI of the published adapter run, on success.
        reason: One human line on why it failed (or "completed").
        exit_code: The container's exit code, when known.
    """

    succeeded: bool
    adapter_uri: str | None = None
    reason: str = ""
    exit_code: int | None = None


@dataclass(frozen=True)
class Progress:
    """Where a Job stands, from its status and its pods.

    Attributes:
        phase: One of Pending, Running, Succeeded, Failed.
        reason: Short CamelCase reason (``BackoffLimitExceeded``, ``Completed``, ...).
        message: One human line.
        adapter_uri: The published adapter's URI once succeeded.
        exit_code: Exit code of the last terminated container, if any.
        pod_name: The pod the facts were read from.
        node_name: The node that pod was bound to.
    """

    phase: str
    reason: str = ""
    message: str = ""
    adapter_uri: str | None = None
    exit_code: int | None = None
    pod_name: str | None = None
    node_name: str | None = None

    @property
    def finished(self) -> bool:
        """Succeeded or failed: nothing more will happen to this Job."""
        return self.phase in (SUCCEEDED, FAILED)


def termination_message(
    *,
    succeeded: bool,
    adapter_uri: str | None = None,
    reason: str = "",
    exit_code: int = 0,
    evaluation: str | None = None,
) -> str:
    """The one JSON line ``qlora run`` writes to the termination log.

    Args:
        succeeded: Whether the run published a verified adapter.
        adapter_uri: The published run's URI (success only).
        reason: Why it failed, one line (failure only); shortened to fit 4 KiB.
        exit_code: The process exit code (failure only).
        evaluation: The held-out evaluation's one-line summary (success; a failed gate
            carries it in ``reason``).
    """
    if succeeded:
        out: dict[str, str | None] = {"status": "succeeded", "adapter_uri": adapter_uri}
        if evaluation:
            out["evaluation"] = " ".join(evaluation.split())[:2000]
        return json.dumps(out, sort_keys=True)
    line = " ".join(reason.split())[:3500]
    return json.dumps(
        {"status": "failed", "reason": line, "exit_code": int(exit_code)}, sort_keys=True
    )


def write_termination_message(message: str, path: str = TERMINATION_LOG) -> bool:
    """Write the termination line where Kubernetes reads it; a no-op outside a pod.

    Returns:
        True if written; False when the file's directory does not exist (not in a pod).
    """
    if not os.path.isdir(os.path.dirname(path) or "."):
        return False
    with open(path, "w", encoding="utf-8") as f:
        f.write(message[:MAX_TERMINATION_BYTES] + "\n")
    return True


def parse_termination_message(text: str | None, exit_code: int | None = None) -> Termination:
    """Read a container's termination message (JSON line, or fallback log text).

    Args:
        text: ``state.terminated.message`` of the container, possibly empty.
        exit_code: ``state.terminated.exitCode``, used when the text does not say.
    """
    text = (text or "").strip()
    for line in reversed(text.splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("status") in ("succeeded", "failed"):
            code = doc.get("exit_code", exit_code)
            return Termination(
                succeeded=doc["status"] == "succeeded",
                adapter_uri=doc.get("adapter_uri") or None,
                reason=str(doc.get("reason") or ""),
                exit_code=int(code) if isinstance(code, int) else exit_code,
            )
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    ok = exit_code == 0
    fallback = "" if ok else (f"exit code {exit_code}" if exit_code is not None else "")
    return Termination(
        succeeded=ok,
        reason=lines[-1] if lines else fallback,
        exit_code=exit_code,
    )


def container_termination(pod: Mapping[str, Any]) -> Termination | None:
    """The termination facts of a pod's first terminated container (the runner), if any."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for cs in statuses:
        state = cs.get("state") or {}
        last = cs.get("lastState") or {}
        term = state.get("terminated") or last.get("terminated")
        if term:
            return parse_termination_message(term.get("message"), term.get("exitCode"))
    return None


def _condition(obj: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype and c.get("status") == "True":
            return dict(c)
    return None


def _newest(pods: Sequence[Mapping[str, Any]], phase: str) -> Mapping[str, Any] | None:
    matching = [p for p in pods if (p.get("status") or {}).get("phase") == phase]
    matching.sort(key=lambda p: str(p.get("metadata", {}).get("creationTimestamp", "")))
    return matching[-1] if matching else None


def job_progress(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> Progress:
    """Summarise a batch/v1 Job and its pods.

    Args:
        job: The Job as a dict (``status.conditions``, ``status.active`` ...).
        pods: The Job's pods (selected by its ``controller-uid`` / ``job-name`` label).
    """
    done = _condition(job, "Complete")
    failed = _condition(job, "Failed")
    if done:
        pod = _newest(pods, "Succeeded")
        term = container_termination(pod) if pod else None
        return Progress(
            phase=SUCCEEDED,
            reason="Completed",
            message="the job completed"
            + (f"; adapter published at {term.adapter_uri}" if term and term.adapter_uri else ""),
            adapter_uri=term.adapter_uri if term else None,
            exit_code=term.exit_code if term else 0,
            pod_name=_pod_name(pod),
            node_name=_node_name(pod),
        )
    if failed:
        pod = _newest(pods, "Failed")
        term = container_termination(pod) if pod else None
        job_reason = str(failed.get("reason") or "Failed")
        why = term.reason if term and term.reason else str(failed.get("message") or "")
        return Progress(
            phase=FAILED,
            reason=job_reason,
            message=why or job_reason,
            exit_code=term.exit_code if term else None,
            pod_name=_pod_name(pod),
            node_name=_node_name(pod),
        )
    running = _newest(pods, "Running")
    if running:
        return Progress(
            phase=RUNNING,
            reason="PodRunning",
            message=f"pod {_pod_name(running)} runs on {_node_name(running)}",
            pod_name=_pod_name(running),
            node_name=_node_name(running),
        )
    pending = _newest(pods, "Pending")
    if pending:
        node = _node_name(pending)
        where = f"bound to node {node}" if node else "waiting for a node with a matching GPU"
        return Progress(
            phase=PENDING,
            reason="PodPending",
            message=f"pod {_pod_name(pending)} is pending, {where}",
            pod_name=_pod_name(pending),
            node_name=node,
        )
    if (job.get("spec") or {}).get("suspend"):
        return Progress(phase=PENDING, reason="Suspended", message="the job waits in its queue")
    return Progress(phase=PENDING, reason="Created", message="waiting for the job's pod")


COMPLETION_INDEX_KEY = "batch.kubernetes.io/job-completion-index"
"""Annotation (1.21+) and label (1.28+) of an Indexed Job's pods: the node rank."""


@dataclass(frozen=True)
class RankStatus:
    """One pod of a Job over several ranks, as ``qlora status`` lists it.

    Attributes:
        node_rank: The pod's completion index (None when the pod does not say).
        ranks: The global ranks in the pod (``node_rank * ranks_per_pod`` onwards).
        pod_name: The pod.
        phase: The pod's phase.
        node_name: Where it runs.
        exit_code: The runner's exit code once it ended.
        reason: The termination message's reason (or "completed").
    """

    node_rank: int | None
    ranks: tuple[int, ...]
    pod_name: str
    phase: str
    node_name: str | None
    exit_code: int | None
    reason: str


def node_rank_of(pod: Mapping[str, Any]) -> int | None:
    """A pod's node rank: its completion index, else the index the pod was given in its
    environment (a control plane older than Indexed Jobs), else None."""
    meta = pod.get("metadata") or {}
    for source in (meta.get("annotations") or {}, meta.get("labels") or {}):
        value = source.get(COMPLETION_INDEX_KEY)
        if value is not None and str(value).isdigit():
            return int(value)
    for container in (pod.get("spec") or {}).get("containers") or []:
        for env in container.get("env") or []:
            if env.get("name") == "JOB_COMPLETION_INDEX" and str(env.get("value")).isdigit():
                return int(env["value"])
    return None


def ranks_per_pod(job: Mapping[str, Any]) -> int:
    """torchrun processes in each of the Job's pods (1 unless the Job says otherwise)."""
    value = ((job.get("metadata") or {}).get("annotations") or {}).get(
        names.ANNOTATION_RANKS_PER_POD, "1"
    )
    return int(value) if str(value).isdigit() and int(value) > 0 else 1


def rank_statuses(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> list[RankStatus]:
    """The newest pod of each node rank, by node rank (pods without one last)."""
    per_pod = ranks_per_pod(job)
    newest: dict[int | None, Mapping[str, Any]] = {}
    for pod in sorted(pods, key=lambda p: str(p["metadata"].get("creationTimestamp", ""))):
        newest[node_rank_of(pod)] = pod
    out = []
    for index, pod in sorted(newest.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        term = container_termination(pod)
        first = (index or 0) * per_pod
        out.append(
            RankStatus(
                node_rank=index,
                ranks=tuple(range(first, first + per_pod)),
                pod_name=str(pod["metadata"]["name"]),
                phase=str((pod.get("status") or {}).get("phase") or "Pending"),
                node_name=_node_name(pod),
                exit_code=term.exit_code if term else None,
                reason=(term.reason if term else "") or "",
            )
        )
    return out


def pod_of_rank(
    job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], rank: int
) -> str | None:
    """The newest pod that runs global rank ``rank`` (its node rank is ``rank // ranks per
    pod``); a Job of one pod runs every rank in it."""
    statuses = rank_statuses(job, pods)
    if len(statuses) == 1 and statuses[0].node_rank is None:
        return statuses[0].pod_name if rank < ranks_per_pod(job) else None
    for st in statuses:
        if rank in st.ranks:
            return st.pod_name
    return None


def _pod_name(pod: Mapping[str, Any] | None) -> str | None:
    return str(pod["metadata"]["name"]) if pod else None


def _node_name(pod: Mapping[str, Any] | None) -> str | None:
    node = ((pod or {}).get("spec") or {}).get("nodeName")
    return str(node) if node else None


def now_rfc3339() -> str:
    """The current time as Kubernetes writes it (``2026-11-28T09:42:00Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    ctype: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """Conditions with one of them set; ``lastTransitionTime`` moves only when status flips.

    Args:
        conditions: Current conditions.
        ctype: The condition type to set.
        status: True or False.
        reason: CamelCase reason.
        message: One human line.
        generation: The object's ``metadata.generation`` the condition was computed for.
    """
    value = "True" if status else "False"
    out: list[dict[str, Any]] = []
    found = False
    for c in conditions:
        if c.get("type") != ctype:
            out.append(dict(c))
            continue
        found = True
        changed = c.get("status") != value
        new = {
            "type": ctype,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now_rfc3339() if changed else c.get("lastTransitionTime"),
        }
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    if not found:
        new = {
            "type": ctype,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now_rfc3339(),
        }
        if generation is not None:
            new["observedGeneration"] = generation
        out.append(new)
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    out.sort(key=lambda c: order.get(str(c.get("type")), len(order)))
    return out
