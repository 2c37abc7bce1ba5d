"""List + watch caches (client-go's informers) that survive the API server.

One :class:`Informer` keeps every object of one resource in one scope (a namespace, or all
of them) in memory, up to date through a watch, and calls back on each change. The operator
reads FineTuneJobs, Jobs, pods and ResourceQuotas from these caches instead of asking the API
server on every reconcile, so 1,000 FineTuneJobs cost the API server a few watches at rest,
not thousands of GETs per resync.

What keeps a cache right when the control plane misbehaves:

- The watch resumes from the last resourceVersion seen (events and bookmarks), so a watch
  the server closes (its timeout, a restarted kube-apiserver) misses nothing in between.
- A watch that fails to connect is retried with exponential backoff (0.5 s doubling to 30 s),
  never in a hot loop.
- 410 Gone (the resourceVersion is older than etcd keeps: after a compaction, an etcd
  restart, a long outage) **relists**: the new list replaces the cache, objects that vanished
  meanwhile are reported as deleted, and every object is reported again, so nothing that
  happened during the gap is lost.
- Stored objects drop ``metadata.managedFields`` (half of a Job's size, never read).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from runner.errors import KubernetesError
from runner.k8s.api import ExpiredError, KubeApi, Obj, Resource

log = logging.getLogger(__name__)

Handler = Callable[[str, Obj], None]
"""Called with (ADDED | MODIFIED | DELETED, object) for every change."""


def _key(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _slim(obj: Obj) -> Obj:
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        obj = {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    return obj


def newer(a: Obj, b: Obj | None) -> bool:
    """Whether ``a``'s resourceVersion is newer than ``b``'s (integers, as etcd makes them;
    anything else counts as newer)."""
    if b is None:
        return True
    ra = str((a.get("metadata") or {}).get("resourceVersion") or "")
    rb = str((b.get("metadata") or {}).get("resourceVersion") or "")
    if ra.isdigit() and rb.isdigit():
        return int(ra) > int(rb)
    return ra != rb


def parse_selector(selector: str | None) -> dict[str, str] | None:
    """``a=b,c=d`` as a dict; None for anything but plain equalities."""
    if not selector:
        return {}
    out = {}
    for part in selector.split(","):
        k, sep, v = part.partition("=")
        if not sep or v.startswith("=") or k.endswith("!") or not k.strip():
            return None
        out[k.strip()] = v.strip()
    return out


class Informer:
    """A watched cache of one resource in one scope.

    Args:
        api: The Kubernetes API.
        res: The resource.
        namespace: The scope; None for every namespace.
        label_selector: Only objects with these labels.
        handler: Change callback (called from this informer's thread).
        watch_timeout_s: How long one watch request lasts before it is renewed.
        on_restart: Called with a reason (timeout, error, expired) at each re-watch (metrics).
    """

    def __init__(self, api: KubeApi, res: Resource, namespace: str | None, *,
                 label_selector: str | None = None, handler: Handler | None = None,
                 watch_timeout_s: int = 300,
                 on_restart: Callable[[str], None] | None = None) -> None:
        self.api, self.res, self.namespace = api, res, namespace
        self.label_selector = label_selector
        self._handler = handler
        self.watch_timeout_s = watch_timeout_s
        self._on_restart = on_restart
        self._lock = threading.Lock()
        self._store: dict[tuple[str, str], Obj] = {}
        self.synced = threading.Event()
        """Set once the first list is in the cache."""
        self.relists = 0
        """Lists after the first (410 Gone, or a watch that could not resume)."""

    # -- reading -------------------------------------------------------------------------------

    def get(self, namespace: str | None, name: str) -> Obj | None:
        """The cached object, or None."""
        with self._lock:
            return self._store.get((namespace or "", name))

    def items(self, namespace: str | None = None) -> list[Obj]:
        """Cached objects (of one namespace, or all)."""
        with self._lock:
            return [o for (ns, _), o in self._store.items() if namespace is None or ns == namespace]

    def select(self, namespace: str | None, labels: dict[str, str]) -> list[Obj]:
        """Cached objects whose labels include ``labels``."""
        out = []
        for obj in self.items(namespace):
            have = (obj.get("metadata") or {}).get("labels") or {}
            if all(have.get(k) == v for k, v in labels.items()):
                out.append(obj)
        return out

    def put(self, obj: Obj) -> None:
        """Store an object the caller just wrote (write-through), unless the cache already
        holds a newer version of it."""
        obj = _slim(obj)
        with self._lock:
            if newer(obj, self._store.get(_key(obj))):
                self._store[_key(obj)] = obj

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """List, then watch, until ``stop``."""
        backoff = 0.5
        rv: str | None = None
        while not stop.is_set():
            try:
                if rv is None:
                    rv = self._list()
                    backoff = 0.5
                rv = self._watch(rv, stop)
                self._restarted("timeout")
            except ExpiredError:
                log.info("watch of %s expired (410); listing again", self._what())
                self._restarted("expired")
                rv = None
            except KubernetesError as e:
                log.warning("watch of %s failed: %s; retrying in %.1f s", self._what(),
                            e.message, backoff)
                self._restarted("error")
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _list(self) -> str:
        items, rv = self.api.list_objects(self.res, self.namespace, self.label_selector)
        fresh = {_key(o): _slim(o) for o in items}
        with self._lock:
            gone = [o for k, o in self._store.items() if k not in fresh]
            self._store = fresh
        if self.synced.is_set():
            self.relists += 1
        for obj in gone:
            self._emit("DELETED", obj)
        for obj in fresh.values():
            self._emit("ADDED", obj)
        self.synced.set()
        return rv

    def _watch(self, rv: str, stop: threading.Event) -> str:
        for etype, obj in self.api.watch(self.res, self.namespace, resource_version=rv,
                                         label_selector=self.label_selector,
                                         timeout_s=self.watch_timeout_s):
            rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
            if etype in ("ADDED", "MODIFIED"):
                obj = _slim(obj)
                with self._lock:
                    self._store[_key(obj)] = obj
                self._emit(etype, obj)
            elif etype == "DELETED":
                with self._lock:
                    self._store.pop(_key(obj), None)
                self._emit(etype, obj)
            if stop.is_set():
                break
        return rv

    def _emit(self, etype: str, obj: Obj) -> None:
        if self._handler is None:
            return
        try:
            self._handler(etype, obj)
        except Exception:  # a handler bug must not kill the watch
            log.exception("event handler failed for %s", self._what())

    def _restarted(self, reason: str) -> None:
        if self._on_restart is not None:
            self._on_restart(reason)

    def _what(self) -> str:
        return f"{self.res.plural} in {self.namespace or 'every namespace'}"


class Cache:
    """The operator's read side: informers by resource, answering like :class:`KubeApi`'s
    ``get`` and ``list_objects``.

    Args:
        informers: Every informer, several per resource when the scope is a namespace list.
    """

    def __init__(self, informers: Iterable[Informer]) -> None:
        self.informers = list(informers)

    def _of(self, res: Resource, namespace: str | None) -> list[Informer]:
        return [i for i in self.informers if i.res == res
                and (i.namespace is None or namespace is None or i.namespace == namespace)]

    def synced(self) -> bool:
        """Every informer has listed."""
        return all(i.synced.is_set() for i in self.informers)

    def get(self, res: Resource, namespace: str | None, name: str) -> Obj | None:
        """The cached object, or None."""
        for inf in self._of(res, namespace):
            got = inf.get(namespace, name)
            if got is not None:
                return got
        return None

    def list_objects(self, res: Resource, namespace: str | None,
                     label_selector: str | None = None) -> tuple[list[Obj], str]:
        """Cached objects matching an equality selector (resourceVersion ``""``).

        Raises:
            ValueError: a selector the cache cannot evaluate (only ``k=v,...`` is supported).
        """
        labels = parse_selector(label_selector)
        if labels is None:
            raise ValueError(f"selector {label_selector!r}: only k=v,... selectors are cached")
        out: list[Obj] = []
        for inf in self._of(res, namespace):
            out += inf.select(namespace, labels)
        return out, ""

    def put(self, res: Resource, obj: Obj) -> None:
        """Write-through of an object the operator just wrote."""
        ns = (obj.get("metadata") or {}).get("namespace")
        for inf in self._of(res, ns):
            inf.put(obj)
            return

    def keys(self, res: Resource, namespace: str | None = None) -> list[tuple[str, str]]:
        """(namespace, name) of every cached object of ``res``."""
        return [_key(o) for inf in self._of(res, namespace) for o in inf.items(namespace)]
