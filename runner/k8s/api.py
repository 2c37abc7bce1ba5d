"""The small interface the submitter and operator use to talk to Kubernetes.

:class:`KubeApi` is a ``Protocol`` over plain JSON dicts: the submitter and operator are written
against it, and :mod:`runner.k8s.client` is its only implementation (the only module that
imports the ``kubernetes`` package). Keeping the interface here, free of third-party imports,
lets the pure code and the CLI name it without pulling in the client library.

Errors are the project's own: every failure is a :class:`~runner.errors.KubernetesError`
(exit code 8) whose message names the object (``namespace/name``), with subclasses callers
branch on (not found, conflict, expired watch).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from runner.errors import KubernetesError

FIELD_MANAGER = "qlora-runner"

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """A REST resource: enough to build its URL.

    Attributes:
        api_version: ``v1``, ``batch/v1``, ``qlora-runner.io/v1alpha1`` ...
        kind: ``Job``, ``ConfigMap`` ...
        plural: The URL segment, ``jobs``.
        namespaced: Whether objects live in a namespace.
    """

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    @property
    def group(self) -> str:
        """The API group, empty for the core group."""
        return self.api_version.rpartition("/")[0]

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        """The URL path of the collection, or of one object when ``name`` is given."""
        base = f"/apis/{self.api_version}" if self.group else f"/api/{self.api_version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name else base

    def describe(self, namespace: str | None, name: str | None = None) -> str:
        """``job default/bot-1a2b3c4d`` style coordinates for messages."""
        where = "/".join(p for p in (namespace if self.namespaced else None, name) if p)
        return f"{self.kind.lower()} {where}".strip()


CONFIGMAPS = Resource("v1", "ConfigMap", "configmaps")
PODS = Resource("v1", "Pod", "pods")
NAMESPACES = Resource("v1", "Namespace", "namespaces", namespaced=False)
JOBS = Resource("batch/v1", "Job", "jobs")
SERVICES = Resource("v1", "Service", "services")
FINETUNEJOBS = Resource("qlora-runner.io/v1alpha1", "FineTuneJob", "finetunejobs")
LEASES = Resource("coordination.k8s.io/v1", "Lease", "leases")
RESOURCEQUOTAS = Resource("v1", "ResourceQuota", "resourcequotas")
KNOWN = {
    (r.api_version, r.kind): r
    for r in (CONFIGMAPS, PODS, NAMESPACES, JOBS, SERVICES, FINETUNEJOBS, LEASES, RESOURCEQUOTAS)
}


def resource_of(obj: Mapping[str, Any]) -> Resource:
    """The :class:`Resource` of a rendered object (by ``apiVersion`` and ``kind``).

    Raises:
        KubernetesError: for a kind this project never creates.
    """
    key = (str(obj.get("apiVersion")), str(obj.get("kind")))
    if key not in KNOWN:
        raise KubernetesError(f"{key[1]} ({key[0]}): not a kind qlora-runner manages")
    return KNOWN[key]


class NotFoundError(KubernetesError):
    """The object (or its namespace, or its resource type) does not exist (HTTP 404)."""


class ConflictError(KubernetesError):
    """A write lost a race (stale resourceVersion) or hit another manager's fields (409)."""


class ExpiredError(KubernetesError):
    """A watch's resourceVersion is too old (HTTP 410): list again, then watch."""


class QuotaExceededError(KubernetesError):
    """A ResourceQuota of the namespace has no room for the object (HTTP 403, exceeded quota):
    not a permission problem, and it passes once the namespace's jobs free their share."""


class KubeApi(Protocol):
    """What qlora-runner needs from the Kubernetes API, over plain dicts."""

    def apply(self, obj: Obj, *, force: bool = True) -> Obj:
        """Server-side apply ``obj`` (field manager ``qlora-runner``); returns the live object."""
        ...

    def get(self, res: Resource, namespace: str | None, name: str) -> Obj | None:
        """The object, or None if it does not exist."""
        ...

    def list_objects(
        self, res: Resource, namespace: str | None, label_selector: str | None = None
    ) -> tuple[list[Obj], str]:
        """Objects matching the selector, and the list's resourceVersion (to watch from)."""
        ...

    def watch(
        self,
        res: Resource,
        namespace: str | None,
        *,
        resource_version: str,
        label_selector: str | None = None,
        timeout_s: int = 60,
    ) -> Iterator[tuple[str, Obj]]:
        """``(ADDED|MODIFIED|DELETED|BOOKMARK, object)`` events until ``timeout_s``.

        Raises:
            ExpiredError: the resourceVersion is too old; list again.
        """
        ...

    def delete(self, res: Resource, namespace: str | None, name: str) -> bool:
        """Delete with background propagation; False if it was already gone."""
        ...

    def create(self, obj: Obj) -> Obj:
        """Create ``obj`` (POST); :class:`ConflictError` if it exists already."""
        ...

    def replace(self, obj: Obj) -> Obj:
        """Replace ``obj`` (PUT) at its ``metadata.resourceVersion``; :class:`ConflictError`
        if the object has moved on since."""
        ...

    def patch(
        self, res: Resource, namespace: str, name: str, body: Obj, *,
        resource_version: str | None = None,
    ) -> Obj:
        """Merge-patch the object (RBAC verb ``patch``); with ``resource_version`` only that
        version of it (else :class:`ConflictError`)."""
        ...

    def patch_status(
        self,
        res: Resource,
        namespace: str,
        name: str,
        status: Obj,
        *,
        resource_version: str | None = None,
    ) -> Obj:
        """Merge-patch the status subresource; returns the live object.

        With ``resource_version`` the patch only applies to that version of the object
        (else :class:`ConflictError`): status computed from a stale read is never written.
        """
        ...

    def pod_logs(
        self, namespace: str, name: str, *, follow: bool = False, container: str | None = None
    ) -> Iterator[str]:
        """Lines of a pod's log (following it while the container runs if ``follow``)."""
        ...
