"""The machinery around the FineTuneJob reconciler: caches, work queue, workers, leadership.

:class:`Controller` runs one :class:`~runner.k8s.operator.Operator` the way
controller-runtime runs a reconciler:

- **Informers** (:mod:`runner.k8s.informer`) list + watch FineTuneJobs, and the Jobs, pods
  (label ``app.kubernetes.io/managed-by=qlora-operator``) and ResourceQuotas of every watched
  namespace (one watch per resource for all namespaces, or per listed namespace). They run on
  every replica, leader or not, so a standby is Ready and takes over with a warm cache.
- Each event queues the FineTuneJob it concerns (a Job's or pod's ``qlora-runner.io/job``
  label; a ResourceQuota change queues the namespace's waiting FineTuneJobs) in the
  **work queue** (:mod:`runner.k8s.workqueue`): deduplicated by ``namespace/name``.
- ``workers`` threads reconcile keys, only while this replica leads. A failed reconcile (an
  API error, a 409 conflict, a bug) re-queues its key with per-key exponential backoff
  (``QLORA_OPERATOR_RETRY_BASE_DELAY_S`` doubling to ``..._MAX_DELAY_S``); the other keys go on.
- Every ``resync_s`` the leader queues every cached FineTuneJob (a missed event is repaired;
  reconciles that change nothing write nothing, so at rest the API sees no writes).
- **Leader election** (:mod:`runner.k8s.leader`) decides who works. Taking the Lease queues
  everything; losing it stops the workers from taking new keys.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from runner.k8s import names
from runner.k8s.api import FINETUNEJOBS, JOBS, PODS, RESOURCEQUOTAS, ConflictError, Obj
from runner.k8s.informer import Cache, Informer
from runner.k8s.leader import LeaderElector
from runner.k8s.operator import MANAGED_BY
from runner.k8s.status import FAILED, SUCCEEDED
from runner.k8s.workqueue import ExponentialBackoff, WorkQueue

if TYPE_CHECKING:
    from runner.k8s.operator import Operator

log = logging.getLogger(__name__)

Key = tuple[str, str]
LIVENESS_BOUND_S = 120.0
"""A loop (main, election, worker) silent for longer than this is wedged: /healthz fails and
the kubelet restarts the pod."""
WATCH_TIMEOUT_S = 300
"""One watch request's length before it is renewed (client-go picks 5-10 min)."""


def default_identity() -> str:
    """This replica's Lease holder identity: the pod name plus a random suffix, as client-go
    does, so a restarted pod with the same name is a new candidate. The pod name comes from
    ``POD_NAME`` (the chart sets it from the downward API: under hostNetwork the hostname is
    the node's, the same for every replica there), else the hostname."""
    who = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{who}_{uuid.uuid4().hex[:8]}"


class Controller:
    """Informers, work queue, workers and leader election around one reconciler.

    Args:
        op: The reconciler (its settings hold the queue and election parameters).
        identity: Lease holder identity (default: :func:`default_identity`).
        watch_timeout_s: Length of one watch request.
    """

    def __init__(self, op: Operator, *, identity: str | None = None,
                 watch_timeout_s: int = WATCH_TIMEOUT_S) -> None:
        self.op = op
        s = op.settings
        self.metrics = op.metrics
        self._stop = threading.Event()
        self._leading = threading.Event()
        self.queue: WorkQueue[Key] = WorkQueue(
            ExponentialBackoff(s.operator_retry_base_delay_s, s.operator_retry_max_delay_s),
            on_depth=self.metrics.queue_depth.set,
        )
        selector = f"{names.LABEL_MANAGED_BY}={MANAGED_BY}"
        scopes: list[str | None] = list(op.namespaces) if op.namespaces else [None]
        informers = []
        for ns in scopes:
            for res, sel in ((FINETUNEJOBS, None), (JOBS, selector), (PODS, selector),
                             (RESOURCEQUOTAS, None)):
                informers.append(Informer(
                    op.api, res, ns, label_selector=sel, handler=self._on_event,
                    watch_timeout_s=watch_timeout_s, on_restart=self._restart_counter(res.plural),
                ))
        self.cache = Cache(informers)
        self.elector: LeaderElector | None = None
        if op.leader_election:
            self.elector = LeaderElector(
                op.api,
                namespace=s.operator_lease_namespace or s.namespace,
                name=s.operator_lease_name,
                identity=identity or default_identity(),
                lease_duration_s=s.operator_lease_duration_s,
                renew_deadline_s=s.operator_renew_deadline_s,
                retry_period_s=s.operator_retry_period_s,
                on_change=self._on_leading,
            )
        self._beats: dict[str, float] = {}

    def _restart_counter(self, plural: str) -> Callable[[str], None]:
        def count(reason: str) -> None:
            self.metrics.watch_restarts.labels(resource=plural, reason=reason).inc()

        return count

    # -- state --------------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """Whether this replica's workers reconcile."""
        return self._leading.is_set()

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stop.set()

    def live(self) -> tuple[bool, str]:
        """Liveness: every loop ticked within :data:`LIVENESS_BOUND_S`."""
        now = time.monotonic()
        beats = dict(self._beats)
        if self.elector is not None:
            beats["leader-election"] = self.elector.beat
        stale = [f"{n} ({now - t:.0f} s)" for n, t in beats.items()
                 if now - t > LIVENESS_BOUND_S]
        if stale and not self._stop.is_set():
            return False, "not ticking: " + ", ".join(sorted(stale))
        return True, "alive"

    def ready(self) -> tuple[bool, str]:
        """Readiness: every informer has listed. A standby is ready (rolling updates)."""
        waiting = [f"{i.res.plural}@{i.namespace or '*'}" for i in self.cache.informers
                   if not i.synced.is_set()]
        if waiting:
            return False, "waiting for the first list of " + ", ".join(waiting)
        return True, "leader" if self.leading else "standby"

    # -- the loop -----------------------------------------------------------------------------

    def run(self, max_seconds: float | None = None) -> None:
        """Run until :meth:`stop` or ``max_seconds``; a clean stop releases the Lease."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        op = self.op
        op.cache, op.reader = self.cache, self.cache
        threads = [threading.Thread(target=inf.run, args=(self._stop,), daemon=True,
                                    name=f"watch-{inf.res.plural}-{inf.namespace or 'all'}")
                   for inf in self.cache.informers]
        threads += [threading.Thread(target=self._work, args=(f"worker-{i}",), daemon=True,
                                     name=f"worker-{i}") for i in range(op.workers)]
        elector_thread = None
        if self.elector is not None:
            elector_thread = threading.Thread(target=self.elector.run, args=(self._stop,),
                                              daemon=True, name="leader-election")
        for t in threads:
            t.start()
        log.info("operator started", extra={
            "namespace": ",".join(op.namespaces) if op.namespaces else "*",
            "workers": op.workers, "leader_election": self.elector is not None})
        self._wait_synced(deadline)
        if elector_thread is not None:
            elector_thread.start()
        else:
            self._on_leading(True)
        next_resync = time.monotonic() + op.resync_s
        try:
            while not self._stop.is_set():
                now = self._beats["main"] = time.monotonic()
                if deadline is not None and now >= deadline:
                    break
                if now >= next_resync:
                    next_resync = now + op.resync_s
                    if self.leading:
                        self._queue_all()
                self._stop.wait(0.5)
        finally:
            self._stop.set()
            self.queue.shutdown()
            if elector_thread is not None:
                elector_thread.join(timeout=10)  # releases the Lease
            until = time.monotonic() + 5  # watches blocked in a read end on their own
            for t in threads:
                t.join(timeout=max(until - time.monotonic(), 0.01))
            op.cache, op.reader = None, op.api
            log.info("operator stopped")

    def _wait_synced(self, deadline: float | None) -> None:
        while not self._stop.is_set() and not self.cache.synced():
            self._beats["main"] = time.monotonic()
            if deadline is not None and time.monotonic() >= deadline:
                return
            self._stop.wait(0.1)

    def _on_leading(self, leading: bool) -> None:
        self.metrics.leader.set(1 if leading else 0)
        if leading:
            self._leading.set()
            self._queue_all()
        else:
            self._leading.clear()

    def _queue_all(self) -> None:
        for key in self.cache.keys(FINETUNEJOBS):
            self.queue.add(key)

    def _on_event(self, etype: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        ns = str(meta.get("namespace") or "")
        kind = obj.get("kind")
        if kind == FINETUNEJOBS.kind or obj.get("apiVersion") == FINETUNEJOBS.api_version:
            if etype != "DELETED":
                self.queue.add((ns, str(meta.get("name"))))
            return
        if kind == RESOURCEQUOTAS.kind:  # usage changed: look at what waits in the namespace
            for ftj in self.cache.list_objects(FINETUNEJOBS, ns)[0]:
                if (ftj.get("status") or {}).get("phase") not in (SUCCEEDED, FAILED):
                    self.queue.add((ns, str(ftj["metadata"]["name"])))
            return
        owner = (meta.get("labels") or {}).get(names.LABEL_JOB)
        if owner:
            self.queue.add((ns, str(owner)))

    # -- workers ------------------------------------------------------------------------------

    def _work(self, name: str) -> None:
        while not self._stop.is_set():
            self._beats[name] = time.monotonic()
            if not self._leading.wait(0.5):
                continue
            key = self.queue.get(timeout_s=0.5)
            if key is None:
                continue
            try:
                if self._leading.is_set():
                    self._process(key)
                else:
                    self.queue.add(key)  # the next leader (maybe us) will do it
            finally:
                self.queue.done(key)

    def _process(self, key: Key) -> None:
        ns, name = key
        ftj = self.cache.get(FINETUNEJOBS, ns, name)
        if ftj is None:
            self.queue.forget(key)
            self.op.forget(ns, name)
            return
        start = time.monotonic()
        result = "ok"
        try:
            if self.op.reconcile(ftj):
                self.queue.add(key)
            self.queue.forget(key)
        except ConflictError:
            result = "conflict"
            log.info("finetunejob %s/%s changed meanwhile; reconciling again", ns, name)
            self._retry(key)
        except Exception as e:  # a RunnerError, or a bug: back off, never stop the others
            result = "error"
            lines = getattr(e, "lines", None)
            text = "; ".join(lines()) if callable(lines) else f"{type(e).__name__}: {e}"
            delay = self._retry(key)
            log.error("reconcile of finetunejob %s/%s failed: %s; retrying in %.1f s", ns, name,
                      text, delay, exc_info=not callable(lines))
        finally:
            self.metrics.observe_reconcile(time.monotonic() - start, result)

    def _retry(self, key: Key) -> float:
        self.metrics.retries.inc()
        return self.queue.add_rate_limited(key)
