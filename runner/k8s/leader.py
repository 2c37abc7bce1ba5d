"""Leader election through a ``coordination.k8s.io/v1`` Lease, as client-go does it.

Several operator replicas run at once (two by default, so a rolling update or a lost node
never leaves FineTuneJobs unattended); only the one holding the Lease reconciles. The rules
are client-go's ``leaderelection`` package:

- A candidate reads the Lease every ``retry_period_s``. It takes the Lease when nobody holds
  it, or when the holder's record (holder, renewTime) has not changed for ``lease_duration_s``
  **as observed on this candidate's own monotonic clock** (never by comparing the holder's
  timestamps with ours, so clock skew between nodes does not matter).
- Every write is an update at the resourceVersion just read: of two candidates racing for an
  expired Lease, the API server lets exactly one win (the other gets 409 and stays standby).
- The leader renews every ``retry_period_s``. If it has not renewed for ``renew_deadline_s``
  (API server unreachable, process starved) it stops leading *before* the Lease can expire
  for the others (``renew_deadline_s < lease_duration_s``), so two leaders never overlap.
- On a clean shutdown (SIGTERM in a rolling update) the leader releases the Lease (empty
  holder, duration 1 s) so the standby takes over at its next retry instead of waiting out
  the lease duration. A killed leader is replaced within ``lease_duration_s`` plus one retry.

Why not ``kubernetes.leaderelection`` (the client library's own): it measures expiry with
``time.time()`` (wall-clock jumps expire or extend leases), sleeps without a stop signal (a
SIGTERM waits out a retry period), never releases the Lease on shutdown (every rolling update
then waits the full lease duration), and talks through its own API client, outside this
project's error translation and request metrics. This module is the same algorithm over
:class:`runner.k8s.api.KubeApi` (get, create, update on one named Lease: the RBAC it needs).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from runner.errors import KubernetesError
from runner.k8s.api import LEASES, ConflictError, KubeApi, Obj

log = logging.getLogger(__name__)

JITTER = 1.2
"""client-go's JitterFactor: a candidate's retry waits retry period x [1, 1.2)."""


def micro_time() -> str:
    """Now as a Kubernetes MicroTime (``2026-12-01T21:45:00.123456Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaign for, hold and release one Lease.

    Args:
        api: The Kubernetes API.
        namespace: Namespace of the Lease (the operator's own).
        name: Name of the Lease.
        identity: This replica's holder identity (pod name + a random suffix).
        lease_duration_s: How long a silent holder keeps the Lease for the others.
        renew_deadline_s: How long the leader tries to renew before it gives up leading.
        retry_period_s: Pause between tries.
        on_change: Called with True when this replica starts leading, False when it stops.
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(self, api: KubeApi, *, namespace: str, name: str, identity: str,
                 lease_duration_s: float = 15.0, renew_deadline_s: float = 10.0,
                 retry_period_s: float = 2.0,
                 on_change: Callable[[bool], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self._on_change = on_change
        self._clock = clock
        self._leading = False
        self._observed: tuple[Any, ...] | None = None  # (holder, renewTime, transitions)
        self._observed_at = 0.0
        self._last_renew = 0.0
        self.holder: str | None = None
        """The holder last seen in the Lease (this replica or another)."""
        self.beat = clock()
        """When the election loop last ran (liveness)."""

    @property
    def leading(self) -> bool:
        """Whether this replica holds the Lease right now."""
        return self._leading

    def run(self, stop: threading.Event) -> None:
        """Campaign and renew until ``stop``; release the Lease on the way out if held."""
        try:
            while not stop.is_set():
                self.beat = now = self._clock()
                ok = self._try()
                if ok:
                    self._last_renew = now
                    if not self._leading:
                        self._set_leading(True)
                elif self._leading and now - self._last_renew >= self.renew_deadline_s:
                    log.error("could not renew lease %s/%s for %.0f s; no longer leading",
                              self.namespace, self.name, now - self._last_renew)
                    self._set_leading(False)
                pause = self.retry_period_s
                if not self._leading:
                    pause *= random.uniform(1.0, JITTER)
                stop.wait(pause)
        finally:
            if self._leading:
                self._set_leading(False)
                self.release()

    def release(self) -> None:
        """Give the Lease up (empty holder) so a standby takes it at its next try."""
        try:
            lease = self.api.get(LEASES, self.namespace, self.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"] = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1,
                             "renewTime": micro_time()}
            self.api.replace(lease)
            log.info("released lease %s/%s", self.namespace, self.name)
        except KubernetesError as e:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name,
                        e.message)

    # -- one try ---------------------------------------------------------------------------

    def _try(self) -> bool:
        """One acquire-or-renew; True if this replica holds the Lease afterwards."""
        try:
            return self._try_once()
        except ConflictError:
            return False  # another candidate wrote first
        except KubernetesError as e:
            log.warning("leader election: %s", e.message)
            return False

    def _try_once(self) -> bool:
        now = self._clock()
        lease = self.api.get(LEASES, self.namespace, self.name)
        if lease is None:
            self.api.create(self._lease(None))
            self.holder = self.identity
            log.info("created lease %s/%s; leading", self.namespace, self.name)
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        self.holder = holder or None
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration_s)
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False  # held, and renewed within its duration as we observed it
        self.api.replace(self._lease(lease))
        if holder != self.identity:
            log.info("acquired lease %s/%s (previous holder: %s)", self.namespace, self.name,
                     holder or "none")
        self.holder = self.identity
        return True

    def _lease(self, current: Obj | None) -> Obj:
        now = micro_time()
        spec = (current or {}).get("spec") or {}
        mine = spec.get("holderIdentity") == self.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine or not current else 1)
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if current is not None:
            meta = dict(current["metadata"])
        return {
            "apiVersion": LEASES.api_version,
            "kind": LEASES.kind,
            "metadata": meta,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(round(self.lease_duration_s), 1),
                "acquireTime": spec.get("acquireTime") if mine else now,
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }

    def _set_leading(self, leading: bool) -> None:
        self._leading = leading
        log.info("%s lease %s/%s", "leading with" if leading else "stopped leading with",
                 self.namespace, self.name, extra={"identity": self.identity})
        if self._on_change is not None:
            self._on_change(leading)
