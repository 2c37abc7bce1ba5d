"""The Kubernetes API adapter: the only module that imports the ``kubernetes`` package.

It implements :class:`runner.k8s.api.KubeApi` over plain JSON dicts with the client library's
configuration loading (kubeconfig, contexts, exec plugins, in-cluster service accounts), TLS
and authentication, but sends its own small set of REST calls: server-side apply, get, list,
watch, delete, status patches and pod logs. Every failure leaves here as a
:class:`~runner.errors.KubernetesError` naming the object and what to do (401: the credentials;
403: which verb on which resource; 404; 409; 422 with each invalid field; unreachable).

Old API servers: server-side apply rejects fields a server does not know (``.spec.podFailurePolicy:
field not declared in schema``). :meth:`KubeClient.apply` therefore reads the server's version
once and drops the fields in :data:`NEWER_FIELDS` that are newer than the server, logging a
warning that names them. The full objects are schema-checked offline against current Kubernetes
versions by the renderer's tests (kubernetes-validate).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from copy import deepcopy
from typing import Any

from runner.errors import KubernetesError, missing_extra
from runner.k8s.api import (
    FIELD_MANAGER,
    PODS,
    ConflictError,
    ExpiredError,
    NotFoundError,
    Obj,
    QuotaExceededError,
    Resource,
    resource_of,
)

try:
    import urllib3
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise missing_extra("kubernetes", "k8s") from e

log = logging.getLogger(__name__)

# (kind, dotted path, first minor version that knows it). '*' walks every list item.
NEWER_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("Job", "spec.suspend", 21),
    ("Job", "spec.completionMode", 21),
    ("Job", "spec.podFailurePolicy", 25),
    ("Job", "spec.backoffLimitPerIndex", 28),
    ("Job", "spec.maxFailedIndexes", 28),
    ("Job", "spec.podReplacementPolicy", 28),
    ("Job", "spec.managedBy", 30),
    ("Job", "spec.successPolicy", 31),
    ("Job", "spec.template.spec.os", 23),
    ("Job", "spec.template.spec.hostUsers", 25),
    ("Job", "spec.template.spec.schedulingGates", 26),
    ("Job", "spec.template.spec.resourceClaims", 26),
    ("Job", "spec.template.spec.containers.*.resizePolicy", 27),
    ("Job", "spec.template.spec.initContainers.*.restartPolicy", 28),
)

_TIMEOUT = (5.0, 60.0)  # connect, read (seconds) for ordinary calls


def load_client(
    kubeconfig: str | None = None,
    context: str | None = None,
    *,
    timeout_s: float = 60.0,
    impersonate: str | None = None,
) -> KubeClient:
    """A client from a kubeconfig (``--kubeconfig`` > ``$KUBECONFIG`` > ``~/.kube/config``),
    or from the pod's service account when running in a cluster.

    Args:
        kubeconfig: Kubeconfig file.
        context: Context in it.
        timeout_s: Read timeout of ordinary calls.
        impersonate: Act as this user (``Impersonate-User``), e.g. to check what a
            ServiceAccount may do.

    Raises:
        KubernetesError: no usable configuration.
    """
    cfg = k8s_client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG")
    default = os.path.expanduser("~/.kube/config")
    try:
        if path or context or os.path.exists(default) or not os.environ.get(
            "KUBERNETES_SERVICE_HOST"
        ):
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=path or default, context=context, client_configuration=cfg
            )
        else:
            k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=cfg
            )
    except (ConfigException, OSError, ValueError, TypeError) as e:
        where = path or default
        raise KubernetesError(
            f"no usable Kubernetes configuration ({where}"
            + (f", context {context}" if context else "")
            + f"): {e}; pass --kubeconfig/--context or set KUBECONFIG"
        ) from e
    api_client = k8s_client.ApiClient(cfg)
    if impersonate:
        api_client.set_default_header("Impersonate-User", impersonate)  # type: ignore[no-untyped-call]
    return KubeClient(api_client, timeout_s=timeout_s)


class KubeClient:
    """:class:`runner.k8s.api.KubeApi` over a configured ``kubernetes.client.ApiClient``.

    Args:
        api_client: Configured client (host, TLS, credentials).
        field_manager: Server-side apply field manager.
        timeout_s: Read timeout of ordinary calls.
    """

    def __init__(
        self,
        api_client: Any,
        *,
        field_manager: str = FIELD_MANAGER,
        timeout_s: float = 60.0,
    ) -> None:
        self._api = api_client
        self._field_manager = field_manager
        self._timeout = (_TIMEOUT[0], timeout_s)
        self._minor: int | None = None
        self.on_request: Callable[[str, str], None] | None = None
        """Called as ``on_request(verb, resource plural)`` before each request (metrics)."""

    @property
    def host(self) -> str:
        """The API server URL."""
        return str(self._api.configuration.host)

    def close(self) -> None:
        """Release connections."""
        self._api.close()

    # -- the KubeApi protocol ---------------------------------------------------------------

    def apply(self, obj: Obj, *, force: bool = True) -> Obj:
        """Server-side apply; fields the server is too old for are dropped with a warning."""
        res = resource_of(obj)
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace"), str(meta.get("name"))
        body = self.drop_unknown_fields(obj)
        query = [("fieldManager", self._field_manager), ("force", "true" if force else "false")]
        return self._json(
            "PATCH",
            res.path(ns, name),
            what=("patch", res, ns, name),
            query=query,
            body=body,
            content_type="application/apply-patch+yaml",
        )

    def get(self, res: Resource, namespace: str | None, name: str) -> Obj | None:
        """The object, or None when it does not exist."""
        try:
            return self._json("GET", res.path(namespace, name), what=("get", res, namespace, name))
        except NotFoundError:
            return None

    def list_objects(
        self, res: Resource, namespace: str | None, label_selector: str | None = None
    ) -> tuple[list[Obj], str]:
        """Matching objects and the list's resourceVersion."""
        query = [("labelSelector", label_selector)] if label_selector else []
        what = ("list", res, namespace, None)
        out = self._json("GET", res.path(namespace), what=what, query=query)
        items = list(out.get("items") or [])
        for item in items:  # list items come without apiVersion/kind
            item.setdefault("apiVersion", res.api_version)
            item.setdefault("kind", res.kind)
        return items, str((out.get("metadata") or {}).get("resourceVersion", ""))

    def watch(
        self,
        res: Resource,
        namespace: str | None,
        *,
        resource_version: str,
        label_selector: str | None = None,
        timeout_s: int = 60,
    ) -> Iterator[tuple[str, Obj]]:
        """Watch events until the server ends the watch after ``timeout_s``."""
        query = [
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(int(timeout_s))),
        ]
        if label_selector:
            query.append(("labelSelector", label_selector))
        what = ("watch", res, namespace, None)
        resp = self._send("GET", res.path(namespace), what=what, query=query, stream=True,
                          timeout=(self._timeout[0], timeout_s + 15))
        try:
            for line in _lines(resp, what, self):
                if not line.strip():
                    continue
                event = json.loads(line)
                etype, obj = str(event.get("type")), event.get("object") or {}
                if etype == "ERROR":
                    code = int(obj.get("code") or 0)
                    if code == 410:
                        raise ExpiredError(
                            f"watch {res.plural}: resourceVersion {resource_version} expired"
                        )
                    raise self._error(code, obj, what)
                yield etype, obj
        finally:
            resp.release_conn()

    def delete(self, res: Resource, namespace: str | None, name: str) -> bool:
        """Delete with background propagation (owned pods go too); False if already gone."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            self._json("DELETE", res.path(namespace, name), what=("delete", res, namespace, name),
                       body=body)
        except NotFoundError:
            return False
        return True

    def create(self, obj: Obj) -> Obj:
        """POST ``obj``; a 409 (it exists) is :class:`ConflictError`."""
        res = resource_of(obj)
        ns = (obj.get("metadata") or {}).get("namespace")
        name = str((obj.get("metadata") or {}).get("name"))
        return self._json("POST", res.path(ns), what=("create", res, ns, name), body=obj)

    def replace(self, obj: Obj) -> Obj:
        """PUT ``obj`` guarded by its resourceVersion (409 when stale)."""
        res = resource_of(obj)
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace"), str(meta.get("name"))
        return self._json("PUT", res.path(ns, name), what=("update", res, ns, name), body=obj)

    def patch(
        self, res: Resource, namespace: str, name: str, body: Obj, *,
        resource_version: str | None = None,
    ) -> Obj:
        """Merge-patch the object (optimistic if versioned)."""
        if resource_version:
            body = {**body, "metadata": {**(body.get("metadata") or {}),
                                         "resourceVersion": resource_version}}
        return self._json("PATCH", res.path(namespace, name), what=("patch", res, namespace, name),
                          body=body, content_type="application/merge-patch+json")

    def patch_status(
        self,
        res: Resource,
        namespace: str,
        name: str,
        status: Obj,
        *,
        resource_version: str | None = None,
    ) -> Obj:
        """Merge-patch ``status`` through the status subresource (optimistic if versioned)."""
        body: Obj = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return self._json(
            "PATCH",
            res.path(namespace, name) + "/status",
            what=("patch", res, namespace, f"{name}/status"),
            body=body,
            content_type="application/merge-patch+json",
        )

    def pod_logs(
        self, namespace: str, name: str, *, follow: bool = False, container: str | None = None
    ) -> Iterator[str]:
        """Log lines of a pod; while ``follow``, until the container ends."""
        query = [("follow", "true" if follow else "false")]
        if container:
            query.append(("container", container))
        what = ("get", PODS, namespace, f"{name}/log")
        resp = self._send("GET", PODS.path(namespace, name) + "/log", what=what, query=query,
                          stream=True, timeout=(self._timeout[0], None if follow else 60))
        try:
            yield from _lines(resp, what, self)
        finally:
            resp.release_conn()

    # -- server version and old servers ------------------------------------------------------

    def server_minor(self) -> int:
        """The API server's minor version (``20`` for v1.20.2), read once."""
        if self._minor is None:
            info = self._json("GET", "/version", what=("get", None, None, "version"))
            digits = "".join(ch for ch in str(info.get("minor", "")) if ch.isdigit())
            self._minor = int(digits) if digits else 99
        return self._minor

    def drop_unknown_fields(self, obj: Obj) -> Obj:
        """``obj`` without the fields in :data:`NEWER_FIELDS` newer than the server."""
        minor = self.server_minor()
        out = deepcopy(obj)
        dropped = [
            path
            for kind, path, since in NEWER_FIELDS
            if kind == out.get("kind") and minor < since and _drop(out, path.split("."))
        ]
        if dropped:
            meta = out.get("metadata") or {}
            log.warning(
                "the API server (1.%d) is too old for %s; applying %s %s/%s without them",
                minor, ", ".join(dropped), out.get("kind"), meta.get("namespace"),
                meta.get("name"),
                extra={"dropped_fields": dropped, "server_minor": minor},
            )
        return out

    # -- transport ---------------------------------------------------------------------------

    def _json(
        self,
        method: str,
        path: str,
        *,
        what: tuple[str, Resource | None, str | None, str | None],
        query: list[tuple[str, str]] | None = None,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        resp = self._send(method, path, what=what, query=query, body=body,
                          content_type=content_type)
        data = resp.read()
        try:
            return dict(json.loads(data or b"{}"))
        except ValueError as e:
            raise KubernetesError(
                f"{_describe(what)}: the API server sent something other than JSON: "
                f"{data[:200]!r}"
            ) from e

    def _send(
        self,
        method: str,
        path: str,
        *,
        what: tuple[str, Resource | None, str | None, str | None],
        query: list[tuple[str, str]] | None = None,
        body: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        stream: bool = False,
        timeout: tuple[float, float | None] | None = None,
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        if self.on_request is not None:
            res = what[1]
            self.on_request(what[0], res.plural if res is not None else "-")
        try:
            _, url, headers, _, _ = self._api.param_serialize(
                method, path, query_params=query or [], header_params=headers,
                auth_settings=["BearerToken"],
            )
            resp = self._api.rest_client.request(
                method, url, headers=headers, body=dict(body) if body is not None else None,
                _request_timeout=timeout or self._timeout,
            )
        except (urllib3.exceptions.HTTPError, ApiException, OSError) as e:
            raise KubernetesError(
                f"cannot reach the Kubernetes API at {self.host} ({_describe(what)}): "
                f"{_short(e)}; check --kubeconfig/--context and that the cluster is up"
            ) from e
        status = int(resp.status)
        if 200 <= status < 300:
            return resp.response if stream else resp
        raw = resp.read() if not stream else resp.response.read()
        try:
            payload = json.loads(raw or b"{}")
        except ValueError:
            payload = {"message": raw[:300].decode("utf-8", "replace")}
        raise self._error(status, payload if isinstance(payload, dict) else {}, what)

    def _error(
        self, status: int, payload: Mapping[str, Any], what: tuple[str, Resource | None,
                                                                   str | None, str | None]
    ) -> KubernetesError:
        verb, res, _, _ = what
        coords = _describe(what)
        msg = str(payload.get("message") or payload.get("reason") or f"HTTP {status}")
        if status == 401:
            return KubernetesError(
                f"{coords}: unauthorized (401) by {self.host}: the credentials were rejected; "
                "refresh the token or pick another --context"
            )
        if status == 403 and "exceeded quota" in msg:
            return QuotaExceededError(f"{coords}: {msg}")
        if status == 403:
            target = "this resource"
            if res is not None:
                target = res.plural + (f" in API group '{res.group}'" if res.group else "")
            return KubernetesError(
                f"{coords}: forbidden (403): {msg}; ask a cluster admin for RBAC permission to "
                f"'{verb}' {target}"
            )
        if status == 404:
            hint = ""
            if res is not None and res.group == "qlora-runner.io" and (
                "could not find" in msg or "page not found" in msg
            ):
                hint = (
                    "; the FineTuneJob CRD is not installed "
                    "(qlora render --crd | kubectl apply -f -)"
                )
            elif msg.startswith("namespaces ") and verb != "delete":
                hint = "; create the namespace or pass --namespace"
            return NotFoundError(f"{coords}: not found (404): {msg}{hint}")
        if status == 409:
            return ConflictError(f"{coords}: conflict (409): {msg}")
        if status == 422:
            causes = (payload.get("details") or {}).get("causes") or []
            lines = [f"{c.get('field', '?')}: {c.get('message', '')}" for c in causes]
            return KubernetesError(f"{coords}: rejected as invalid (422)", lines or [msg])
        return KubernetesError(f"{coords}: the API server answered {status}: {msg}")


def _lines(resp: Any, what: tuple[str, Resource | None, str | None, str | None],
           client: KubeClient) -> Iterator[str]:
    """Decoded lines of a streamed response; transport errors become KubernetesError."""
    buf = b""
    try:
        for chunk in resp.stream(4096, decode_content=True):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                yield line.decode("utf-8", "replace")
    except (urllib3.exceptions.HTTPError, OSError) as e:
        if isinstance(e, urllib3.exceptions.ReadTimeoutError):
            return
        raise KubernetesError(
            f"{_describe(what)}: the stream from {client.host} broke: {_short(e)}"
        ) from e
    if buf:
        yield buf.decode("utf-8", "replace")


def _drop(obj: Any, parts: list[str]) -> bool:
    """Remove the field at ``parts`` ('*' = every list item); True if anything was removed."""
    if not parts:
        return False
    head, rest = parts[0], parts[1:]
    if head == "*":
        if not isinstance(obj, list):
            return False
        return any([_drop(item, rest) for item in obj])  # noqa: C419 - visit every item
    if not isinstance(obj, dict) or head not in obj:
        return False
    if not rest:
        del obj[head]
        return True
    return _drop(obj[head], rest)


def _describe(what: tuple[str, Resource | None, str | None, str | None]) -> str:
    verb, res, ns, name = what
    if res is None:
        return f"{verb} {name or ''}".strip()
    return f"{verb} {res.describe(ns, name)}".strip()


def _short(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    text = str(reason or e)
    return text.splitlines()[0][:300] if text else type(e).__name__
