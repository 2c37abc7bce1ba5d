"""``qlora operator``: the FineTuneJob controller.

Level-triggered: every reconcile reads the FineTuneJob, its Job and the Job's pods, computes
what should exist and what the status should say, and writes only the difference. No state
is kept between reconciles but a watched cache of the cluster, so a restarted operator
resumes from the cluster state. Watches on FineTuneJobs, and on the Jobs and pods the
operator created (label ``app.kubernetes.io/managed-by=qlora-operator``), only decide *when*
to reconcile which FineTuneJob; a periodic resync catches anything a watch missed. The
machinery around this class (informer caches, work queue, workers, leader election) is
:mod:`runner.k8s.controller`; :meth:`Operator.reconcile_all` (``--once``) reads the API
directly. Under the controller, reads come from the cache, but creating a Job is decided on a
fresh read of the FineTuneJob and deleting one on a fresh read of that Job.

One reconcile of a FineTuneJob:

1. Deleted (``deletionTimestamp``): nothing to do; its ConfigMap and Job carry a controller
   ownerReference and the garbage collector removes them. No finalizer is needed.
2. Validate ``spec`` (:func:`runner.spec.validate_document`). Invalid: ``Failed`` condition,
   reason ``InvalidSpec``, the ``path: message`` lines as message, and no retry until the
   spec changes (``metadata.generation``): never a crash loop.
3. Plan. Fits nothing: ``Failed``/``DoesNotFit``. The model's config unreadable (S3): ``Pending``/
   ``ModelConfigUnreadable``, retried with backoff. Else ``Planned`` with status.gpuClass,
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
8. No room in the namespace's ResourceQuotas for the Job's pod (:mod:`runner.k8s.quota`), or
   a quota rejecting the Job itself: ``Pending``, reason ``QuotaExceeded``, no Job created and
   no timer; a change of the quota's usage reconciles it again.

RBAC the operator's ServiceAccount needs: exactly :data:`RBAC_RULES`, nothing more. The
operator watches one namespace (``$QLORA_NAMESPACE``) unless started with ``--all-namespaces``,
so the rules belong in a **Role + RoleBinding in that namespace**; only ``--all-namespaces``
needs a ClusterRole. (create: server-side apply of an object that does not exist yet is
authorised as create; patch: server-side apply and the status merge-patch; delete: a running
Job of an outdated spec; services create/patch/delete: the headless Service of a run over
several nodes, applied with its Job and deleted with an outdated one; finetunejobs/finalizers
update: the OwnerReferencesPermissionEnforcement
admission plugin asks for it before it accepts ``blockOwnerDeletion`` owner references. Pods are
read only for their termination messages, ResourceQuotas only for their room: no pods/log, no
events, no secrets, and no write to the FineTuneJob itself.) A namespace-scoped install for
several tenants (``QLORA_OPERATOR_NAMESPACES``) puts the Role in each listed namespace. Leader
election adds :data:`LEADER_ELECTION_RULES` in the operator's own namespace.
``tests/test_k8s_rbac.py`` checks ``manifests/rbac.yaml`` against these tables with
impersonation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from runner.errors import ExitCode, PlanError, RunnerError, SpecError, StorageError
from runner.k8s import names
from runner.k8s.api import (
    FINETUNEJOBS,
    JOBS,
    PODS,
    RESOURCEQUOTAS,
    SERVICES,
    ConflictError,
    KubeApi,
    Obj,
    QuotaExceededError,
    Resource,
    resource_of,
)
from runner.k8s.exit_policy import POLICY_REASON, policy_failure, stop_job
from runner.k8s.manifests import job_of, render_objects
from runner.k8s.quota import no_room
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
from runner.plan import Plan, make_plan
from runner.settings import Settings
from runner.spec import JobSpec, spec_hash, validate_document

if TYPE_CHECKING:
    from runner.k8s.controller import Controller
    from runner.k8s.informer import Cache
    from runner.k8s.operator_metrics import OperatorMetrics

log = logging.getLogger(__name__)

MANAGED_BY = "qlora-operator"

RBAC_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (API group, resource, verbs)
    ("qlora-runner.io", "finetunejobs", ("get", "list", "watch")),
    ("qlora-runner.io", "finetunejobs/status", ("patch",)),
    ("qlora-runner.io", "finetunejobs/finalizers", ("update",)),
    ("batch", "jobs", ("get", "list", "watch", "create", "patch", "delete")),
    ("", "configmaps", ("get", "list", "watch", "create", "patch", "delete")),
    # The headless Service of a run over several nodes: applied, deleted with an outdated Job.
    ("", "services", ("create", "patch", "delete")),
    ("", "pods", ("get", "list", "watch")),
    ("", "resourcequotas", ("get", "list", "watch")),
)
"""The API calls the operator makes in every namespace it watches, as RBAC rules (see the
module docstring)."""
LEADER_ELECTION_RULES: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    # (API group, resource, verbs, resourceNames): only in the operator's own namespace.
    # RBAC cannot limit create to a name (the name is not known when it is authorised).
    ("coordination.k8s.io", "leases", ("create",), ()),
    ("coordination.k8s.io", "leases", ("get", "update"), ("qlora-operator",)),
)
"""The Lease calls of leader election (:mod:`runner.k8s.leader`): get, create and update of
the one Lease, nothing else (no list, watch, patch or delete)."""
OOM_EXIT_CODE = int(ExitCode.CUDA_OOM)
QUOTA_EXCEEDED = "QuotaExceeded"
MODEL_UNREADABLE = "ModelConfigUnreadable"


class Reader(Protocol):
    """Where a reconcile reads from: the API server itself, or the informer cache."""

    def get(self, res: Resource, namespace: str | None, name: str) -> Obj | None: ...

    def list_objects(self, res: Resource, namespace: str | None,
                     label_selector: str | None = None) -> tuple[list[Obj], str]: ...


class Operator:
    """The FineTuneJob reconciler (and, through :meth:`run`, the controller around it).

    Args:
        api: The Kubernetes API.
        settings: Deployment settings (image, S3, GPU class table, operator settings).
        namespace: Namespace to watch; None watches all (unless ``namespaces``).
        namespaces: Namespaces to watch (a namespace-scoped install); wins over ``namespace``.
        resync_s: Reconcile every FineTuneJob at least this often.
        max_replans: Out-of-memory re-plans before giving up.
        planner: ``make_plan`` (tests may pass their own).
        leader_election: Campaign for the Lease before reconciling (:mod:`runner.k8s.leader`).
        workers: FineTuneJobs reconciled at once (default: the setting).
        metrics: The operator's metrics (default: a fresh registry).
    """

    def __init__(
        self,
        api: KubeApi,
        settings: Settings,
        *,
        namespace: str | None = None,
        namespaces: Sequence[str] | None = None,
        resync_s: float = 30.0,
        max_replans: int = 3,
        planner: Callable[[JobSpec, Settings], Plan] = make_plan,
        leader_election: bool = False,
        workers: int | None = None,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self.api = api
        self.settings = settings
        self.namespaces: list[str] | None = (
            list(namespaces) if namespaces else ([namespace] if namespace else None))
        self.namespace = namespace if not namespaces else None
        self.resync_s = resync_s
        self.max_replans = max_replans
        self.planner = planner
        self.leader_election = leader_election
        self.workers = workers or settings.operator_workers
        if metrics is None:
            from runner.k8s.operator_metrics import OperatorMetrics

            metrics = OperatorMetrics()
        self.metrics = metrics
        self.reader: Reader = api
        self._memo: dict[tuple[str, str], tuple[Any, ...]] = {}
        self.cache: Cache | None = None
        self._controller: Controller | None = None

    # -- the loop (runner.k8s.controller) ----------------------------------------------------

    def run(self, max_seconds: float | None = None) -> None:
        """Watch and reconcile until :meth:`stop` or ``max_seconds``."""
        from runner.k8s.controller import Controller

        self._controller = Controller(self)
        self._controller.run(max_seconds)

    def stop(self) -> None:
        """Ask :meth:`run` to return (from another thread or a signal handler)."""
        if self._controller is not None:
            self._controller.stop()

    @property
    def leading(self) -> bool:
        """Whether this replica reconciles (holds the Lease, or runs without election)."""
        return self._controller is not None and self._controller.leading

    def live(self) -> tuple[bool, str]:
        """Liveness for ``/healthz``."""
        if self._controller is None:
            return True, "starting"
        return self._controller.live()

    def ready(self) -> tuple[bool, str]:
        """Readiness for ``/readyz`` (a standby is ready too)."""
        if self._controller is None:
            return False, "starting"
        return self._controller.ready()

    def reconcile_all(self) -> None:
        """Reconcile every FineTuneJob once, reading from the API (``qlora operator --once``;
        errors are logged per object, never raised).

        Raises:
            KubernetesError: FineTuneJobs cannot be listed (no CRD, no permission, no API).
        """
        scopes: list[str | None] = list(self.namespaces) if self.namespaces else [None]
        for ns in scopes:
            items, _ = self.api.list_objects(FINETUNEJOBS, ns)
            for ftj in items:
                self.reconcile_key(str(ftj["metadata"].get("namespace")),
                                   ftj["metadata"]["name"])

    def forget(self, namespace: str, name: str) -> None:
        """Drop what was remembered of a deleted FineTuneJob."""
        self._memo.pop((namespace, name), None)

    def reconcile_key(self, namespace: str, name: str) -> str:
        """Reconcile one FineTuneJob by key, outside the work queue (409s are read again).

        Returns:
            ``ok``, ``requeue`` (reconcile again soon), ``conflict`` or ``error``.
        """
        for _ in range(3):  # a 409 means the object moved on: read it again
            try:
                ftj = self.api.get(FINETUNEJOBS, namespace, name)
                if ftj is None:
                    return "ok"
                return "requeue" if self.reconcile(ftj) else "ok"
            except ConflictError:
                log.info("finetunejob %s/%s changed meanwhile; reconciling again", namespace, name)
            except RunnerError as e:
                log.error("reconcile of finetunejob %s/%s failed: %s", namespace, name,
                          "; ".join(e.lines()))
                return "error"
            except Exception:  # a bug must not stop the controller for every other object
                log.exception("reconcile of finetunejob %s/%s crashed", namespace, name)
                return "error"
        return "conflict"

    # -- one reconcile -----------------------------------------------------------------------

    def reconcile(self, ftj: Obj) -> bool:
        """Bring one FineTuneJob's objects and status in line with its spec (idempotent).

        Returns:
            True when it should be reconciled again right away (a re-plan was started).

        Raises:
            ConflictError: the FineTuneJob changed since it was read (read it again).
            KubernetesError: an API call failed (the work queue retries with backoff).
        """
        meta = ftj["metadata"]
        if meta.get("deletionTimestamp"):
            return False
        ns, name = str(meta["namespace"]), str(meta["name"])
        old = dict(ftj.get("status") or {})
        gen = int(meta.get("generation") or 0)
        st: dict[str, Any] = dict(old)
        st["observedGeneration"] = gen
        conditions = list(old.get("conditions") or [])

        # Validating, planning and rendering are pure but cost milliseconds of CPU each; a
        # resync of a thousand unchanged FineTuneJobs reuses them (same uid, generation,
        # labels and attempt give the same spec, plan and objects).
        vkey = (meta.get("uid"), gen, tuple(sorted((meta.get("labels") or {}).items())))
        memo = self._memo.get((ns, name))
        if memo is not None and memo[0] == vkey:
            spec, digest = memo[1], memo[2]
        else:
            memo = None
            try:
                spec = validate_document(_spec_document(ftj), source=f"finetunejob {ns}/{name}")
            except SpecError as e:
                text = "; ".join(e.details) or e.message
                self._finish(ftj, old, st, conditions, FAILED, "InvalidSpec", text, gen)
                return False
            digest = spec_hash(spec)
        retries = int(old.get("retries") or 0) if old.get("specHash") == digest else 0
        if old.get("specHash") != digest:  # a new spec starts from scratch
            st = {"observedGeneration": gen, "specHash": digest}
            conditions = []
        st["retries"] = retries

        try:
            if memo is not None and memo[3] == retries:
                eff, plan = memo[4], memo[5]
            else:
                memo = None
                eff, plan = self._plan(spec, retries)
        except StorageError as e:
            # The model's config.json could not be read (no credentials, no object, S3
            # down): say so on the FineTuneJob, and let the work queue retry with backoff.
            text = "; ".join(e.lines())
            conditions = set_condition(conditions, PLANNED, False, MODEL_UNREADABLE, text, gen)
            self._finish(ftj, old, st, conditions, PENDING, MODEL_UNREADABLE, text, gen)
            raise
        except (PlanError, SpecError) as e:
            reason = "DoesNotFit" if isinstance(e, PlanError) else "InvalidSpec"
            if retries:
                reason = "OutOfMemory"
            text = "; ".join(e.lines())
            conditions = set_condition(conditions, PLANNED, False, reason, text, gen)
            self._finish(ftj, old, st, conditions, FAILED, reason, text, gen)
            return False
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
        if memo is not None:
            objects = memo[6]
        else:
            objects = render_objects(eff, plan, self.settings, owner=ftj, namespace=ns,
                                     attempt=retries, managed_by=MANAGED_BY,
                                     queue_name=queue_name)
            self._memo[(ns, name)] = (vkey, spec, digest, retries, eff, plan, objects)
        job_obj = job_of(objects)
        job_name = str(job_obj["metadata"]["name"])
        st.update(jobName=job_name, configMapName=job_name)

        if old.get("phase") in (SUCCEEDED, FAILED) and old.get("jobName") == job_name \
                and old.get("observedGeneration") == gen:
            return False  # finished for this spec; a TTL-deleted Job is not run again

        job = self.reader.get(JOBS, ns, job_name)
        if job is None and self.cache is not None:
            # The cache may lag behind another replica's (or our own earlier) writes: look at
            # the live FineTuneJob before creating anything for what the cache says.
            fresh = self.api.get(FINETUNEJOBS, ns, name)
            if fresh is None:
                return False
            if fresh["metadata"].get("resourceVersion") != meta.get("resourceVersion"):
                self.cache.put(FINETUNEJOBS, fresh)
                return self.reconcile(fresh)
            job = self.api.get(JOBS, ns, job_name)
        waiting = job is None or (not _finished(job) and not job_pods(self.reader, job))
        full = self._no_room(ns, job_obj) if waiting else None
        if job is None and full is None:
            try:
                for obj in objects:
                    live = self.api.apply(obj)
                    if self.cache is not None:
                        self.cache.put(resource_of(obj), live)
                    if obj["kind"] == "Job":
                        job = live
            except QuotaExceededError as e:  # a count/jobs.batch or configmaps quota
                full = e.message
            else:
                log.info("created job %s/%s", ns, job_name, extra={"finetunejob": name})
        if full is not None:
            conditions = set_condition(conditions, RUNNING, False, QUOTA_EXCEEDED, full, gen)
            self._finish(ftj, old, st, conditions, PENDING, QUOTA_EXCEEDED, full, gen)
            return False
        self._delete_outdated(ns, name, job_name)
        progress = job_progress_of(self.reader, job) if job else None
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
                return True
            if progress.reason == POLICY_REASON and job is not None:
                stop_job(self.api, ns, job_name)  # no podFailurePolicy on this API server
            reason = "OutOfMemory" if code == OOM_EXIT_CODE else progress.reason
            st["completionTime"] = old.get("completionTime") or now_rfc3339()
            conditions = set_condition(conditions, FAILED, True, reason, text, gen)
            self._finish(ftj, old, st, conditions, FAILED, reason, text, gen)
        return False

    def _plan(self, spec: JobSpec, retries: int) -> tuple[JobSpec, Plan]:
        """The spec and plan of attempt ``retries`` (:mod:`runner.k8s.replan`)."""
        return plan_attempt(spec, retries, self.settings, self.planner)

    def _delete_outdated(self, ns: str, name: str, keep: str) -> None:
        """Stop Jobs of an older spec or attempt that still run (finished ones stay for their
        logs until their TTL)."""
        jobs, _ = self.reader.list_objects(JOBS, ns, f"{names.LABEL_JOB}={name},"
                                                     f"{names.LABEL_MANAGED_BY}={MANAGED_BY}")
        for job in jobs:
            jname = job["metadata"]["name"]
            if jname == keep or _finished(job):
                continue
            if self.cache is not None:  # the cache may lag: decide on the live Job
                live = self.api.get(JOBS, ns, jname)
                if live is None or _finished(live):
                    continue
            log.info("deleting outdated job %s/%s", ns, jname)
            self.api.delete(JOBS, ns, jname)
            if job["spec"].get("completionMode") == "Indexed":  # and its headless Service
                self.api.delete(SERVICES, ns, jname)

    def _no_room(self, ns: str, job: Obj) -> str | None:
        """Why the namespace's ResourceQuotas leave no room for the Job's pod, or None."""
        quotas, _ = self.reader.list_objects(RESOURCEQUOTAS, ns)
        return no_room(quotas, job["spec"]["template"]["spec"]) if quotas else None

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
        live = self.api.patch_status(FINETUNEJOBS, meta["namespace"], meta["name"], st,
                                     resource_version=meta.get("resourceVersion"))
        if self.cache is not None:  # our own write, before its watch event arrives
            self.cache.put(FINETUNEJOBS, live)
        log.info("finetunejob %s/%s: %s (%s)", meta["namespace"], meta["name"], phase, reason,
                 extra={"phase": phase, "reason": reason})


def job_progress_of(api: Reader, job: Obj) -> Progress:
    """:func:`runner.k8s.status.job_progress` of a live Job, with the rendered
    podFailurePolicy applied where the API server dropped it (:mod:`runner.k8s.exit_policy`)."""
    pods = job_pods(api, job)
    return policy_failure(job, pods) or job_progress(job, pods)


def job_pods(api: Reader, job: Mapping[str, Any]) -> list[Obj]:
    """The pods the Job controller created for ``job`` (by its ``controller-uid``)."""
    meta = job["metadata"]
    uid = meta.get("uid")
    sel = f"controller-uid={uid}" if uid else f"job-name={meta['name']}"
    pods, _ = api.list_objects(PODS, meta.get("namespace"), sel)
    return pods


def _finished(job: Mapping[str, Any]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


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
