"""``qlora submit``, ``status``, ``logs`` and ``cancel``: run a spec on a cluster without an
operator.

Submitting plans the spec first, so a spec that fits no GPU class is refused (exit 3) before
anything is created; then it renders the ConfigMap + Job (the same objects ``qlora render``
prints) and applies them with server-side apply. Names carry the spec hash, so submitting the
same spec again changes nothing and reports ``unchanged``.

With ``--wait`` it follows the Job (a watch on it, woken at least every few seconds to look at
the pod), streams the pod's log to stderr while it runs, and ends with the published adapter's
URI on stdout (exit 0), or with the failure reason from the pod's termination message (exit 9,
:class:`~runner.errors.JobFailedError`). The termination message format is documented in
:mod:`runner.k8s.status`. Every API failure is a :class:`~runner.errors.KubernetesError`
(exit 8) with a message that names the object.

The module talks to Kubernetes only through :class:`runner.k8s.api.KubeApi`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from runner.errors import ExitCode, JobFailedError, KubernetesError, PlanError, SubmitError
from runner.k8s import names
from runner.k8s.api import (
    CONFIGMAPS,
    FINETUNEJOBS,
    JOBS,
    PODS,
    SERVICES,
    KubeApi,
    NotFoundError,
    Obj,
    resource_of,
)
from runner.k8s.manifests import job_of, render_objects
from runner.k8s.replan import next_attempt_spec
from runner.k8s.status import (
    SUCCEEDED,
    Progress,
    RankStatus,
    job_progress,
    pod_of_rank,
    rank_statuses,
)
from runner.plan import Plan, make_plan
from runner.settings import Settings
from runner.spec import JobSpec

log = logging.getLogger(__name__)

WAKE_S = 2
"""Longest pause between two looks at a Job while waiting (a watch wakes us earlier)."""


@dataclass(frozen=True)
class Applied:
    """One object after server-side apply: ``created``, ``configured`` or ``unchanged``."""

    kind: str
    namespace: str
    name: str
    action: str

    def __str__(self) -> str:
        return f"{self.kind.lower()}/{self.name} {self.action}"


@dataclass(frozen=True)
class Submission:
    """What ``submit`` did: the plan, the Job's coordinates, and each object's outcome."""

    plan: Plan
    namespace: str
    job_name: str
    applied: tuple[Applied, ...]


def selector(name: str) -> str:
    """Label selector of every object rendered for the spec ``name``."""
    return f"{names.LABEL_JOB}={name}"


def job_pods(api: KubeApi, job: Mapping[str, Any]) -> list[Obj]:
    """The pods the Job controller created for ``job`` (by its ``controller-uid``)."""
    meta = job["metadata"]
    uid = meta.get("uid")
    sel = f"controller-uid={uid}" if uid else f"job-name={meta['name']}"
    pods, _ = api.list_objects(PODS, meta.get("namespace"), sel)
    return pods


class Submitter:
    """Submits specs and follows the Jobs they become.

    Args:
        api: The Kubernetes API.
        settings: Deployment settings (namespace, image, S3, GPU classes).
        err: Where progress and pod logs go (stdout is kept for results).
    """

    def __init__(self, api: KubeApi, settings: Settings, *, err: TextIO | None = None) -> None:
        self.api = api
        self.settings = settings
        self.err = err or sys.stderr

    # -- submit ------------------------------------------------------------------------------

    def submit(
        self,
        spec: JobSpec,
        *,
        namespace: str | None = None,
        queue_name: str | None = None,
        plan: Plan | None = None,
        attempt: int = 0,
    ) -> Submission:
        """Plan, render and apply ``spec`` (``attempt`` > 0: a re-plan, named ``-r<attempt>``).

        Raises:
            PlanError: nothing fits (raised before any API call).
            KubernetesError: the API refused (nothing half-applied is left unreported).
        """
        plan = plan or make_plan(spec, self.settings)
        ns = namespace or self.settings.namespace
        objects = render_objects(spec, plan, self.settings, queue_name=queue_name, namespace=ns,
                                 attempt=attempt)
        job = job_of(objects)  # before any API call: a JobSet/TrainJob is for kubectl apply
        applied = tuple(self._apply(obj) for obj in objects)
        return Submission(plan, ns, str(job["metadata"]["name"]), applied)

    def _apply(self, obj: Obj) -> Applied:
        res = resource_of(obj)
        meta = obj["metadata"]
        ns, name = str(meta["namespace"]), str(meta["name"])
        before = self.api.get(res, ns, name)
        try:
            live = self.api.apply(obj)
        except KubernetesError as e:
            if "immutable" in e.message or any("immutable" in d for d in e.details):
                raise SubmitError(
                    f"{res.describe(ns, name)} already exists with another pod template "
                    f"(did the image or another setting change?); run 'qlora cancel "
                    f"{meta['labels'].get(names.LABEL_JOB, name)}' first, then submit again",
                    e.details,
                ) from e
            raise
        if before is None:
            action = "created"
        elif _unchanged(before, live):
            action = "unchanged"
        else:
            action = "configured"
        return Applied(res.kind, ns, name, action)

    # -- wait --------------------------------------------------------------------------------

    def wait(
        self,
        namespace: str,
        job_name: str,
        *,
        follow_logs: bool = True,
        timeout_s: float | None = None,
    ) -> Progress:
        """Follow a Job to its end; stream its pod's log to ``err`` meanwhile.

        Returns:
            The final :class:`Progress`: succeeded or failed.

        Raises:
            SubmitError: the Job vanished, or ``timeout_s`` passed.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        streamer: _LogStreamer | None = None
        last: tuple[str, str] | None = None
        try:
            while True:
                job = self.api.get(JOBS, namespace, job_name)
                if job is None:
                    raise SubmitError(f"job {namespace}/{job_name} was deleted while waiting")
                progress = job_progress(job, job_pods(self.api, job))
                if (progress.phase, progress.message) != last:
                    last = (progress.phase, progress.message)
                    self._say(f"{job_name}: {progress.phase}: {progress.message}")
                if (follow_logs and streamer is None and progress.pod_name
                        and progress.phase != "Pending"):
                    streamer = _LogStreamer(self.api, namespace, progress.pod_name, self.err)
                    streamer.start()
                if progress.finished:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise SubmitError(
                        f"job {namespace}/{job_name} is still {progress.phase.lower()} after "
                        f"{timeout_s:.0f} s; follow it with 'qlora status' or 'qlora logs -f'"
                    )
                self._sleep_until_change(namespace, job)
        finally:
            if streamer is not None:
                streamer.join(timeout=5)
        return progress

    def wait_with_replans(
        self,
        spec: JobSpec,
        first: Submission,
        *,
        queue_name: str | None = None,
        follow_logs: bool = True,
        timeout_s: float | None = None,
        max_replans: int = 2,
    ) -> tuple[Submission, Progress]:
        """Follow a submitted spec to the end, re-planning after a CUDA out-of-memory exit
        (code 6) up to ``max_replans`` times (:mod:`runner.k8s.replan`); each try is a new Job.

        Returns:
            The last submission and the progress of its succeeded Job.

        Raises:
            JobFailedError: the (last) Job failed; the message carries the pod's reason.
            SubmitError: the Job vanished, or ``timeout_s`` passed.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        done = first
        for attempt in range(max_replans + 1):
            left = None if deadline is None else max(deadline - time.monotonic(), 1.0)
            progress = self.wait(done.namespace, done.job_name, follow_logs=follow_logs,
                                 timeout_s=left)
            if progress.phase == SUCCEEDED:
                return done, progress
            if progress.exit_code != int(ExitCode.CUDA_OOM) or attempt == max_replans:
                raise job_failed(done.namespace, done.job_name, progress)
            try:
                spec = next_attempt_spec(spec, done.plan, self.settings)
            except PlanError as e:
                raise job_failed(done.namespace, done.job_name, progress, e.message) from e
            new_plan = make_plan(spec, self.settings)
            self._say(
                f"{done.job_name}: out of GPU memory; re-planning ({attempt + 1} of "
                f"{max_replans}): {new_plan.gpu_class.name}, micro batch "
                f"{new_plan.micro_batch_size} x {new_plan.gradient_accumulation_steps}"
            )
            done = self.submit(spec, namespace=done.namespace, queue_name=queue_name,
                               plan=new_plan, attempt=attempt + 1)
            for applied in done.applied:
                self._say(f"{done.namespace}: {applied}")
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _sleep_until_change(self, namespace: str, job: Obj) -> None:
        """Block until the Job changes, or at most :data:`WAKE_S` seconds."""
        rv = str(job["metadata"].get("resourceVersion", ""))
        name = job["metadata"]["name"]
        labels = job["metadata"].get("labels") or {}
        sel = selector(labels[names.LABEL_JOB]) if names.LABEL_JOB in labels else None
        try:
            for _etype, obj in self.api.watch(
                JOBS, namespace, resource_version=rv, timeout_s=WAKE_S, label_selector=sel
            ):
                if obj.get("metadata", {}).get("name") == name:
                    return
        except KubernetesError as e:  # a broken watch only costs latency; the loop re-reads
            log.debug("watch of job %s/%s ended: %s", namespace, name, e.message)
            time.sleep(1)

    def _say(self, line: str) -> None:
        print(line, file=self.err, flush=True)

    # -- status, logs, cancel ----------------------------------------------------------------

    def jobs_for(self, name: str, namespace: str) -> list[Obj]:
        """Jobs rendered for the spec ``name``, oldest first."""
        jobs, _ = self.api.list_objects(JOBS, namespace, selector(name))
        jobs.sort(key=lambda j: str(j["metadata"].get("creationTimestamp", "")))
        return jobs

    def status(self, name: str, namespace: str) -> list[tuple[Obj, Progress]]:
        """Each Job of ``name`` with its progress; raises NotFoundError when there is none."""
        jobs = self.jobs_for(name, namespace)
        if not jobs:
            raise NotFoundError(
                f"no job named '{name}' in namespace {namespace} (submitted jobs carry the label "
                f"{selector(name)}; try --namespace)"
            )
        return [(job, job_progress(job, job_pods(self.api, job))) for job in jobs]

    def finetunejob(self, name: str, namespace: str) -> Obj | None:
        """The FineTuneJob ``name``, or None (also when the CRD is not installed)."""
        try:
            return self.api.get(FINETUNEJOBS, namespace, name)
        except NotFoundError:
            return None

    def ranks(self, job: Obj) -> list[RankStatus]:
        """The pods of a Job over several ranks, one per node rank (newest first wins)."""
        return rank_statuses(job, job_pods(self.api, job))

    def logs(
        self, name: str, namespace: str, *, follow: bool, out: TextIO, rank: int = 0
    ) -> None:
        """Print the log of the newest pod running ``rank`` (default 0) of the newest Job of
        ``name``; a pod of several GPUs holds the log of all its ranks."""
        jobs = self.jobs_for(name, namespace)
        if not jobs:
            raise NotFoundError(f"no job named '{name}' in namespace {namespace}")
        job = jobs[-1]
        pods = job_pods(self.api, job)
        if not pods:
            raise NotFoundError(
                f"job {namespace}/{job['metadata']['name']} has no pod yet; "
                f"see 'qlora status {name}'"
            )
        pod = pod_of_rank(job, pods, rank)
        if pod is None:
            raise NotFoundError(
                f"--rank {rank}: job {namespace}/{job['metadata']['name']} has no pod of that "
                f"rank (yet); see 'qlora status {name}'"
            )
        for line in self.api.pod_logs(namespace, pod, follow=follow):
            print(line, file=out, flush=True)

    def cancel(self, name: str, namespace: str) -> list[str]:
        """Stop the job ``name``: delete its FineTuneJob (the operator's objects go with it by
        garbage collection), else its Jobs (every pod goes too, background propagation),
        headless Services (runs over several nodes) and ConfigMaps.

        Returns:
            ``kind/name`` of each deleted object.

        Raises:
            NotFoundError: nothing of that name exists.
        """
        deleted: list[str] = []
        if self.finetunejob(name, namespace) is not None and self.api.delete(
            FINETUNEJOBS, namespace, name
        ):
            deleted.append(f"finetunejob/{name}")
        for res in (JOBS, SERVICES, CONFIGMAPS):
            items, _ = self.api.list_objects(res, namespace, selector(name))
            for item in items:
                if self.api.delete(res, namespace, item["metadata"]["name"]):
                    deleted.append(f"{res.kind.lower()}/{item['metadata']['name']}")
        if not deleted:
            raise NotFoundError(f"no job named '{name}' in namespace {namespace}")
        return deleted


def _unchanged(before: Obj, live: Obj) -> bool:
    """Did an apply leave the object as it was? Controllers update a Job's status (and with
    it the resourceVersion) at any time, so compare everything but status and bookkeeping."""

    def essence(obj: Obj) -> Obj:
        meta = {k: v for k, v in obj["metadata"].items()
                if k not in ("resourceVersion", "managedFields", "generation")}
        return {**{k: v for k, v in obj.items() if k != "status"}, "metadata": meta}

    return essence(before) == essence(live)


def job_failed(
    namespace: str, job_name: str, progress: Progress, hint: str | None = None
) -> JobFailedError:
    """The error for a failed Job, with what to do for the common exit codes."""
    code = progress.exit_code
    hint = hint or {
        int(ExitCode.CUDA_OOM): "lower spec.training.micro_batch_size or pick a larger "
        "resources.gpu_class",
        int(ExitCode.INVALID_INPUT): "fix the spec or dataset ('qlora validate FILE')",
        int(ExitCode.STORAGE): "check the S3 endpoint and the credentials Secret",
    }.get(code if code is not None else -1)
    where = f" (pod {progress.pod_name}" + (f", exit code {code})" if code is not None else ")")
    details = [f"hint: {hint}"] if hint else []
    return JobFailedError(
        f"job {namespace}/{job_name} failed: {progress.reason}: {progress.message}"
        + (where if progress.pod_name else ""),
        details,
    )


class _LogStreamer(threading.Thread):
    """Copies a pod's log to a stream in the background; a log that cannot be read (no
    kubelet reachable, pod gone) is reported once and does not stop the wait."""

    def __init__(self, api: KubeApi, namespace: str, pod: str, out: TextIO) -> None:
        super().__init__(name=f"logs-{pod}", daemon=True)
        self.api, self.namespace, self.pod, self.out = api, namespace, pod, out

    def run(self) -> None:
        try:
            for line in self.api.pod_logs(self.namespace, self.pod, follow=True):
                print(f"[{self.pod}] {line}", file=self.out, flush=True)
        except KubernetesError as e:
            print(f"(log of pod {self.pod} unavailable: {e.message})", file=self.out, flush=True)


