"""``qlora status`` without a name: a table of the FineTuneJobs of a namespace (or all).

One list call, whatever the number of jobs: every column comes from the FineTuneJob's own
status, which the operator keeps current (phase, GPU class, reason, progress, creation
time), so a thousand jobs cost one request, not one per job (the named ``qlora status NAME``
looks at each Job's pods as well). Without the CRD (specs run by ``qlora submit``, no
operator), it lists the submitted Jobs instead, from their labels and conditions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from runner.k8s import names
from runner.k8s.api import FINETUNEJOBS, JOBS, KubeApi, NotFoundError

COLUMNS = ("NAME", "PHASE", "CLASS", "PROGRESS", "AGE")


def age(created: str | None, now: datetime | None = None) -> str:
    """kubectl's short age: ``42s``, ``7m``, ``3h``, ``12d``."""
    if not created:
        return "-"
    try:
        then = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "-"
    secs = max(int(((now or datetime.now(UTC)) - then).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= 2 * size or (unit == "m" and secs >= 120):
            return f"{secs // size}{unit}"
    return f"{secs}s"


def progress(status: Mapping[str, Any]) -> str:
    """One word on where a FineTuneJob stands: its training progress when the status
    carries one, else the reason of its phase (``PodPending``, ``QuotaExceeded``, ...)."""
    shown = status.get("progress")
    if isinstance(shown, Mapping):
        step, total = shown.get("step"), shown.get("totalSteps") or shown.get("total_steps")
        shown = f"{step}/{total}" if step is not None and total else None
    if shown:
        return str(shown)
    if status.get("retries"):
        return f"{status.get('reason') or '-'}(r{status['retries']})"
    return str(status.get("reason") or "-")


def rows(api: KubeApi, namespace: str | None) -> list[tuple[str, ...]]:
    """The table's rows (namespace first when listing all), header included."""
    head = (("NAMESPACE",) if namespace is None else ()) + COLUMNS
    try:
        items, _ = api.list_objects(FINETUNEJOBS, namespace)
    except NotFoundError:  # no CRD: jobs run by `qlora submit`
        return [head, *_job_rows(api, namespace)]
    out = []
    for ftj in sorted(items, key=_sort_key):
        meta, st = ftj["metadata"], ftj.get("status") or {}
        row = (str(meta["name"]), str(st.get("phase") or "Pending"), str(st.get("gpuClass") or "-"),
               progress(st), age(meta.get("creationTimestamp")))
        out.append(((str(meta.get("namespace")),) if namespace is None else ()) + row)
    return [head, *out]


def _job_rows(api: KubeApi, namespace: str | None) -> list[tuple[str, ...]]:
    jobs, _ = api.list_objects(JOBS, namespace, names.LABEL_JOB)
    out = []
    for job in sorted(jobs, key=_sort_key):
        meta, st = job["metadata"], job.get("status") or {}
        done = {c.get("type") for c in st.get("conditions") or [] if c.get("status") == "True"}
        phase = "Succeeded" if "Complete" in done else "Failed" if "Failed" in done else (
            "Running" if st.get("active") else "Pending")
        labels = meta.get("labels") or {}
        row = (str(meta["name"]), phase, str(labels.get(names.LABEL_GPU_CLASS, "-")), "-",
               age(meta.get("creationTimestamp")))
        out.append(((str(meta.get("namespace")),) if namespace is None else ()) + row)
    return out


def _sort_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def format_table(table: Sequence[Sequence[str]]) -> str:
    """Columns padded like kubectl's (two spaces apart)."""
    if not table:
        return ""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in table)
