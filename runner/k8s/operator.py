"""``qlora operator``: the FineTuneJob controller.

Level-triggered: every reconcile reads the FineTuneJob, its Job and the Job's pods, computes
what should exist and what the status should say, and writes only the difference. Nothing is
kept in memory between reconciles, so a restarted operator resumes from the cluster state.
Watches on FineTuneJobs, and on the Jobs and pods the operator created (label
``app.kubernetes.io/managed-by=qlora-operator``), only decide *when* to reconcile which
FineTuneJob; a periodic resync catches anything a watch missed.

One reconcile of a FineTuneJob:

1. Deleted (``deletionTimestamp``): nothing to do; its ConfigMap and Job carry a controller
   ownerReference and the garbage collector removes them. No finalizer is needed.
2. Validate ``spec`` (:func:`runner.spec.validate_document`). Invalid: ``Failed`` condition,
   reason ``InvalidSpec``, the ``path: message`` lines as message, and no retry until the
   spec changes (``metadata.generation``): never a crash loop.
3. Plan. Fits nothing: ``Failed``/``DoesNotFit``. Else ``Planned`` with status.gpuClass,
   status.vramEstimate(Bytes), quantMode, backend.
4. Server-side apply the owned ConfigMap + Job (rendered by :func:`render_objects` with the
   FineTuneJob as owner). A Job of an older spec that is still running is deleted.
5. Mirror the Job into ``Running`` / ``Succeeded`` (status.adapterURI from the pod's
   termination message, see :mod:`runner.k8s.status`) / ``Failed`` (reason and exit code).
6. A CUDA out-of-memory exit (6) re-plans, up to ``max_replans`` times, visible as
   status.retries: first halve the micro batch and double gradient accumulation, and once the
   micro batch is 1, move to the next larger GPU class. The attempt number is part of the new
   Job's name, so every try is a fresh Job.
7. Status is written through the status subresource with the resourceVersion that was read:
   a 409 conflict (the object changed meanwhile) re-reads and reconciles again.

RBAC the operator's ServiceAccount needs: exactly :data:`RBAC_RULES`, nothing more. The
operator watches one namespace (``$QLORA_NAMESPACE``) unless started with ``--all-namespaces``,
so the rules belong in a **Role + RoleBinding in that namespace**; only ``--all-namespaces``
needs a ClusterRole. (create: server-side apply of an object that does not exist yet is
authorised as create; patch: server-side apply and the status merge-patch; delete: a running
Job of an outdated spec; finetunejobs/finalizers update: the OwnerReferencesPermissionEnforcement
admission plugin asks for it before it accepts ``blockOwnerDeletion`` owner references. Pods are
read only for their termination messages: no pods/log, no events, no secrets, and no write to
the FineTuneJob itself.) ``tests/test_k8s_rbac.py`` checks ``manifests/rbac.yaml`` against this
table with impersonation.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from runner.errors import ExitCode, KubernetesError, PlanError, RunnerError, SpecError
from runner.k8s import names
from runner.k8s.api import (
    FINETUNEJOBS,
    JOBS,
    PODS,
    ConflictError,
    ExpiredError,
    KubeApi,
    Obj,
    Resource,
)
from runner.k8s.manifests import render_objects
from runner.k8s.replan import plan_attempt
from runner.k8s.status import (
    FAILED,
    PENDING,
    PLANNED,
    RUNNING,
    SUCCEEDED,
    Progress,
    job_progress,
    now_rfc3339,
    set_condition,
)
from runner.k8s.submitter import job_pods
from runner.plan import Plan, make_plan
from runner.settings import Settings
from runner.spec import JobSpec, spec_hash, validate_document

log = logging.getLogger(__name__)

MANAGED_BY = "qlora-operator"

RBAC_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (API group, resource, verbs)
    ("qlora-runner.io", "finetunejobs", ("get", "list", "watch")),
    ("qlora-runner.io", "finetunejobs/status", ("patch",)),
    ("qlora-runner.io", "finetunejobs/finalizers", ("update",)),
    ("batch", "jobs", ("get", "list", "watch", "create", "patch", "delete")),
    ("", "configmaps", ("get", "list", "watch", "create", "patch", "delete")),
    ("", "pods", ("get", "list", "watch")),
)
"""The API calls the operator makes, as RBAC rules (see the module docstring)."""
OOM_EXIT_CODE = int(ExitCode.CUDA_OOM)
Key = tuple[str, str]
LIVENESS_BOUND_S = 120.0
"""A main loop silent for longer than this is wedged: /healthz fails and the kubelet restarts
the pod."""


class Operator:
    """The FineTuneJob controller.

    Args:
        api: The Kubernetes API.
        settings: Deployment settings (image, S3, GPU class table).
        namespace: Namespace to watch; None watches all.
        resync_s: Reconcile every FineTuneJob at least this often.
        max_replans: Out-of-memory re-plans before giving up.
        planner: ``make_plan`` (tests may pass their own).
    """

    def __init__(
        self,
        api: KubeApi,
        settings: Settings,
        *,
        namespace: str | None = None,
        resync_s: float = 30.0,
        max_replans: int = 3,
        planner: Callable[[JobSpec, Settings], Plan] = make_plan,
    ) -> None:
        self.api = api
        self.settings = settings
        self.namespace = namespace
        self.resync_s = resync_s
        self.max_replans = max_replans
        self.planner = planner
        self._queue: queue.Queue[Key] = queue.Queue()
        self._stop = threading.Event()
        self._listed: set[str] = set()  # watches whose first list has arrived
        self._watch_count = 3
        self._beat = time.monotonic()  # the main loop's last tick (liveness)
        self.leading = True

    # -- health (served by runner.k8s.operator_metrics.HealthServer) -------------------------

    def live(self) -> tuple[bool, str]:
        """Liveness: the main loop ticked recently."""
        idle = time.monotonic() - self._beat
        if self._stop.is_set():
            return True, "stopping"
        if idle > LIVENESS_BOUND_S:
            return False, f"the main loop has not ticked for {idle:.0f} s"
        return True, "alive"

    def ready(self) -> tuple[bool, str]:
        """Readiness: every watch has listed its objects (leader and standby alike)."""
        if len(self._listed) < self._watch_count:
            return False, f"{len(self._listed)} of {self._watch_count} watches have listed"
        return True, "leader" if self.leading else "standby"

    # -- the loop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to return (from another thread or a signal handler)."""
        self._stop.set()

    def run(self, max_seconds: float | None = None) -> None:
        """Watch and reconcile until :meth:`stop` or ``max_seconds``."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        selector = f"{names.LABEL_MANAGED_BY}={MANAGED_BY}"
        watchers = [
            threading.Thread(target=self._watch, args=(res, sel), daemon=True,
                             name=f"watch-{res.plural}")
            for res, sel in ((FINETUNEJOBS, None), (JOBS, selector), (PODS, selector))
        ]
        for w in watchers:
            w.start()
        log.info("operator started", extra={"namespace": self.namespace or "*"})
        next_resync = 0.0
        while not self._stop.is_set():
            now = self._beat = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if now >= next_resync:
                next_resync = now + self.resync_s
                try:
                    self.reconcile_all()
                except KubernetesError as e:
                    log.error("resync failed: %s", e.message)
            try:
                key = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            pending = {key}
            while not self._queue.empty():  # coalesce bursts of events
                pending.add(self._queue.get_nowait())
            for ns, name in sorted(pending):
                self._reconcile_key(ns, name)
        self._stop.set()
        for w in watchers:
            w.join(timeout=5)
        log.info("operator stopped")

    def _watch(self, res: Resource, label_selector: str | None) -> None:
        """List + watch ``res`` forever, queueing the FineTuneJob each event concerns."""
        backoff = 1.0
        while not self._stop.is_set():
            try:
                items, rv = self.api.list_objects(res, self.namespace, label_selector)
                for item in items:
                    self._enqueue(item)
                self._listed.add(res.plural)
                while not self._stop.is_set():
                    for etype, obj in self.api.watch(
                        res, self.namespace, resource_version=rv,
                        label_selector=label_selector, timeout_s=10,
                    ):
                        rv = str(obj.get("metadata", {}).get("resourceVersion") or rv)
                        if etype != "BOOKMARK":
                            self._enqueue(obj)
                        if self._stop.is_set():
                            return
                backoff = 1.0
            except ExpiredError:
                continue
            except KubernetesError as e:
                log.warning("watch of %s failed: %s; retrying in %.0f s", res.plural, e.message,
                            backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _enqueue(self, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        ns = str(meta.get("namespace") or "")
        if obj.get("apiVersion") == FINETUNEJOBS.api_version:
            self._queue.put((ns, str(meta.get("name"))))
            return
        owner = (meta.get("labels") or {}).get(names.LABEL_JOB)
        if owner:
            self._queue.put((ns, str(owner)))

    def reconcile_all(self) -> None:
        """Reconcile every FineTuneJob once (errors are logged per object, never raised).

        Raises:
            KubernetesError: FineTuneJobs cannot be listed (no CRD, no permission, no API).
        """
        items, _ = self.api.list_objects(FINETUNEJOBS, self.namespace)
        for ftj in items:
            self._reconcile_key(str(ftj["metadata"].get("namespace")), ftj["metadata"]["name"])

    def _reconcile_key(self, namespace: str, name: str) -> None:
        for _ in range(3):  # a 409 means the object moved on: read it again
            try:
                ftj = self.api.get(FINETUNEJOBS, namespace, name)
                if ftj is not None:
                    self.reconcile(ftj)
                return
            except ConflictError:
                log.info("finetunejob %s/%s changed meanwhile; reconciling again", namespace, name)
            except RunnerError as e:
                log.error("reconcile of finetunejob %s/%s failed: %s", namespace, name,
                          "; ".join(e.lines()))
                return
            except Exception:  # a bug must not stop the controller for every other object
                log.exception("reconcile of finetunejob %s/%s crashed", namespace, name)
                return

    # -- one reconcile -----------------------------------------------------------------------

    def reconcile(self, ftj: Obj) -> None:
        """Bring one FineTuneJob's objects and status in line with its spec (idempotent)."""
        meta = ftj["metadata"]
        if meta.get("deletionTimestamp"):
            return
        ns, name = str(meta["namespace"]), str(meta["name"])
        old = dict(ftj.get("status") or {})
        gen = int(meta.get("generation") or 0)
        st: dict[str, Any] = dict(old)
        st["observedGeneration"] = gen
        conditions = list(old.get("conditions") or [])

        try:
            spec = validate_document(_spec_document(ftj), source=f"finetunejob {ns}/{name}")
        except SpecError as e:
            text = "; ".join(e.details) or e.message
            self._finish(ftj, old, st, conditions, FAILED, "InvalidSpec", text, gen)
            return
        digest = spec_hash(spec)
        retries = int(old.get("retries") or 0) if old.get("specHash") == digest else 0
        if old.get("specHash") != digest:  # a new spec starts from scratch
            st = {"observedGeneration": gen, "specHash": digest}
            conditions = []
        st["retries"] = retries

        try:
            eff, plan = self._plan(spec, retries)
        except (PlanError, SpecError) as e:
            reason = "DoesNotFit" if isinstance(e, PlanError) else "InvalidSpec"
            if retries:
                reason = "OutOfMemory"
            text = "; ".join(e.lines())
            conditions = set_condition(conditions, PLANNED, False, reason, text, gen)
            self._finish(ftj, old, st, conditions, FAILED, reason, text, gen)
            return
        summary = (f"{plan.gpu_class.name} class, {plan.quant_mode}, micro batch "
                   f"{plan.micro_batch_size} x {plan.gradient_accumulation_steps}, "
                   f"~{plan.vram_estimate_bytes / 1024**3:.1f} GiB VRAM")
        st.update(
            gpuClass=plan.gpu_class.name,
            vramEstimate=f"{plan.vram_estimate_bytes / 1024**3:.1f} GiB",
            vramEstimateBytes=int(plan.vram_estimate_bytes),
            quantMode=plan.quant_mode,
            backend=plan.backend,
        )
        conditions = set_condition(
            conditions, PLANNED, True, "Planned" if not retries else "Replanned",
            summary + (f" (re-plan {retries} after running out of GPU memory)" if retries else ""),
            gen,
        )
        queue_name = (meta.get("labels") or {}).get(names.LABEL_KUEUE_QUEUE)
        objects = render_objects(eff, plan, self.settings, owner=ftj, namespace=ns,
                                 attempt=retries, managed_by=MANAGED_BY, queue_name=queue_name)
        job_obj = next(o for o in objects if o["kind"] == "Job")
        job_name = str(job_obj["metadata"]["name"])
        st.update(jobName=job_name, configMapName=job_name)

        if old.get("phase") in (SUCCEEDED, FAILED) and old.get("jobName") == job_name \
                and old.get("observedGeneration") == gen:
            return  # finished for this spec; a TTL-deleted Job is not run again

        job = self.api.get(JOBS, ns, job_name)
        if job is None:
            for obj in objects:
                self.api.apply(obj)
            job = self.api.get(JOBS, ns, job_name)
            log.info("created job %s/%s", ns, job_name, extra={"finetunejob": name})
        self._delete_outdated(ns, name, job_name)
        progress = job_progress_of(self.api, job) if job else None
        if progress is None or progress.phase == PENDING:
            st.setdefault("startTime", now_rfc3339())
            why = progress.message if progress else "creating the job"
            conditions = set_condition(conditions, RUNNING, False, "Pending", why, gen)
            self._finish(ftj, old, st, conditions, PLANNED, "Planned", why, gen)
        elif progress.phase == RUNNING:
            conditions = set_condition(conditions, RUNNING, True, "PodRunning", progress.message,
                                       gen)
            self._finish(ftj, old, st, conditions, RUNNING, "PodRunning", progress.message, gen)
        elif progress.phase == SUCCEEDED:
            st["adapterURI"] = progress.adapter_uri or ""
            st["completionTime"] = old.get("completionTime") or now_rfc3339()
            conditions = set_condition(conditions, RUNNING, False, "Completed", "finished", gen)
            conditions = set_condition(conditions, SUCCEEDED, True, "Completed", progress.message,
                                       gen)
            self._finish(ftj, old, st, conditions, SUCCEEDED, "Completed", progress.message, gen)
        else:
            code = progress.exit_code
            text = progress.message + (f" (exit code {code})" if code is not None else "")
            conditions = set_condition(conditions, RUNNING, False, progress.reason, text, gen)
            if code == OOM_EXIT_CODE and retries < self.max_replans:
                st["retries"] = retries + 1
                self._finish(ftj, old, st, conditions, PLANNED, "OutOfMemory",
                             f"{text}; re-planning (attempt {retries + 1} of "
                             f"{self.max_replans})", gen)
                self._queue.put((ns, name))
                return
            reason = "OutOfMemory" if code == OOM_EXIT_CODE else progress.reason
            st["completionTime"] = old.get("completionTime") or now_rfc3339()
            conditions = set_condition(conditions, FAILED, True, reason, text, gen)
            self._finish(ftj, old, st, conditions, FAILED, reason, text, gen)

    def _plan(self, spec: JobSpec, retries: int) -> tuple[JobSpec, Plan]:
        """The spec and plan of attempt ``retries`` (:mod:`runner.k8s.replan`)."""
        return plan_attempt(spec, retries, self.settings, self.planner)

    def _delete_outdated(self, ns: str, name: str, keep: str) -> None:
        """Stop Jobs of an older spec or attempt that still run (finished ones stay for their
        logs until their TTL)."""
        jobs, _ = self.api.list_objects(JOBS, ns, f"{names.LABEL_JOB}={name},"
                                                  f"{names.LABEL_MANAGED_BY}={MANAGED_BY}")
        for job in jobs:
            jname = job["metadata"]["name"]
            finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                           for c in (job.get("status") or {}).get("conditions") or [])
            if jname != keep and not finished:
                log.info("deleting outdated job %s/%s", ns, jname)
                self.api.delete(JOBS, ns, jname)

    def _finish(self, ftj: Obj, old: Mapping[str, Any], st: dict[str, Any],
                conditions: list[dict[str, Any]], phase: str, reason: str, message: str,
                gen: int) -> None:
        """Write the status if anything but timestamps changed."""
        if phase == FAILED:
            conditions = set_condition(conditions, FAILED, True, reason, message, gen)
        st.update(phase=phase, reason=reason, message=message[:4000], conditions=conditions)
        if _comparable(st) == _comparable(old):
            return
        meta = ftj["metadata"]
        self.api.patch_status(FINETUNEJOBS, meta["namespace"], meta["name"], st,
                              resource_version=meta.get("resourceVersion"))
        log.info("finetunejob %s/%s: %s (%s)", meta["namespace"], meta["name"], phase, reason,
                 extra={"phase": phase, "reason": reason})


def job_progress_of(api: KubeApi, job: Obj) -> Progress:
    """:func:`runner.k8s.status.job_progress` of a live Job."""
    return job_progress(job, job_pods(api, job))


def _spec_document(ftj: Mapping[str, Any]) -> dict[str, Any]:
    """The FineTuneJob as a job-spec document: server-set metadata and labels reserved for
    tools (``app.kubernetes.io/*`` ...) left out."""
    meta = ftj.get("metadata") or {}
    labels = {k: v for k, v in (meta.get("labels") or {}).items()
              if not k.startswith(names.RESERVED_LABEL_PREFIXES)}
    doc: dict[str, Any] = {
        "apiVersion": ftj.get("apiVersion"),
        "kind": ftj.get("kind"),
        "metadata": {"name": meta.get("name")},
        "spec": ftj.get("spec"),
    }
    if labels:
        doc["metadata"]["labels"] = labels
    return doc


def _comparable(status: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in status.items() if k not in ("startTime",)}
    out["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                         for c in status.get("conditions") or []]
    return out
