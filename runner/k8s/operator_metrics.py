"""The operator's own metrics and its HTTP endpoint: ``/healthz``, ``/readyz``, ``/metrics``.

A platform team runs the operator like any controller: the kubelet probes it, Prometheus
scrapes it, and a rolling update must find the new pod Ready before the old one goes. One
small HTTP server (standard library, one thread per request) serves all three on one port
(``QLORA_OPERATOR_METRICS_PORT``, default 8080; ``QLORA_OPERATOR_BIND_ADDRESS``):

- ``/healthz`` (liveness): 200 while the operator's loops are alive; 503 when one of them has
  stopped ticking for longer than its bound (a wedged process the kubelet should restart).
- ``/readyz`` (readiness): 200 once every watch has listed its objects, **for the leader and
  for a standby alike** (body ``ok: leader`` or ``ok: standby``), so a Deployment's rolling
  update proceeds while the Lease still belongs to the old pod; 503 before.
- ``/metrics``: the Prometheus text format of :class:`OperatorMetrics`, held in a
  :class:`~prometheus_client.CollectorRegistry` of its own.

Metric names (base units, ``_total`` counters, low-cardinality labels)::

    qlora_operator_reconcile_duration_seconds{result}   histogram; result ok|error|conflict
    qlora_operator_queue_depth                          gauge: keys waiting (not in progress)
    qlora_operator_queue_retries_total                  counter: rate-limited re-queues
    qlora_operator_reconcile_errors_total               counter: failed reconciles
    qlora_operator_leader                               gauge: 1 while this replica leads
    qlora_operator_api_requests_total{verb,resource}    counter: calls to the API server
    qlora_operator_watch_restarts_total{resource,reason} counter: re-watches and relists

Besides :mod:`runner.metrics` (the training run's), this is the only module that imports
``prometheus_client``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from runner.errors import SpecError

log = logging.getLogger(__name__)

PREFIX = "qlora_operator"
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds; one reconcile is a few API calls, so most land between 10 ms and 1 s."""

Probe = Callable[[], tuple[bool, str]]
"""A health check: (healthy, one line saying why)."""


class OperatorMetrics:
    """Every metric of one operator process, in its own registry.

    Args:
        registry: Where to register; a fresh :class:`CollectorRegistry` when omitted.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.reconcile_duration = Histogram(
            f"{PREFIX}_reconcile_duration_seconds",
            "Time one reconcile of a FineTuneJob took, by result (ok, error, conflict).",
            ["result"], registry=reg, buckets=RECONCILE_BUCKETS,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth", "FineTuneJobs waiting in the work queue.", registry=reg
        )
        self.retries = Counter(
            f"{PREFIX}_queue_retries", "FineTuneJobs re-queued with backoff after a failure.",
            registry=reg,
        )
        self.errors = Counter(
            f"{PREFIX}_reconcile_errors", "Reconciles that failed (API error or a bug).",
            registry=reg,
        )
        self.leader = Gauge(
            f"{PREFIX}_leader", "1 while this replica holds the Lease and reconciles, else 0.",
            registry=reg,
        )
        self.api_requests = Counter(
            f"{PREFIX}_api_requests", "Requests the operator sent to the Kubernetes API server.",
            ["verb", "resource"], registry=reg,
        )
        self.watch_restarts = Counter(
            f"{PREFIX}_watch_restarts",
            "Watches started again, by reason (timeout, error, expired: a relist).",
            ["resource", "reason"], registry=reg,
        )
        for result in ("ok", "error", "conflict"):
            self.reconcile_duration.labels(result=result)

    def observe_reconcile(self, seconds: float, result: str) -> None:
        """Record one reconcile's duration and, unless ok, an error."""
        self.reconcile_duration.labels(result=result).observe(seconds)
        if result == "error":
            self.errors.inc()

    def count_request(self, verb: str, resource: str) -> None:
        """Count one API request (the client's request hook)."""
        self.api_requests.labels(verb=verb, resource=resource).inc()

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return bytes(generate_latest(self.registry))

    def value(self, name: str, **labels: str) -> float | None:
        """A sample's current value (tests and the load bench)."""
        got = self.registry.get_sample_value(name, labels or None)
        return None if got is None else float(got)


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on one port, in a background thread.

    Args:
        metrics: What ``/metrics`` serves.
        live: Liveness probe.
        ready: Readiness probe.
        port: TCP port (0: any free one, see :attr:`port`).
        bind_address: Listening address.
        port_tries: Ports tried from ``port`` upwards; the first free one is bound (two
            replicas on one node's network each get their own).
        endpoint_file: Where to write ``host:port`` once bound (for exec probes), or None.
    """

    def __init__(self, metrics: OperatorMetrics, *, live: Probe, ready: Probe, port: int,
                 bind_address: str = "0.0.0.0", port_tries: int = 1,
                 endpoint_file: str | None = None) -> None:
        self.metrics = metrics
        self._probes: dict[str, Probe] = {"/healthz": live, "/livez": live, "/readyz": ready}
        self._endpoint_file = Path(endpoint_file) if endpoint_file else None
        candidates = [port] if port == 0 else list(range(port, min(port + port_tries, 65536)))
        last: OSError | None = None
        for candidate in candidates:
            try:
                self._server = ThreadingHTTPServer((bind_address, candidate), _handler(self))
                break
            except OSError as e:
                last = e
        else:
            assert last is not None
            tried = f"{port}" if len(candidates) == 1 else f"{port}-{candidates[-1]}"
            raise SpecError(
                f"QLORA_OPERATOR_METRICS_PORT: cannot listen on {bind_address}:{tried}: "
                f"{last.strerror or last}; pick a free port (or QLORA_OPERATOR_BIND_ADDRESS, "
                "QLORA_OPERATOR_METRICS_PORT_TRIES)"
            ) from last
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="operator-http",
                                        kwargs={"poll_interval": 0.5}, daemon=True)

    @property
    def port(self) -> int:
        """The port actually bound."""
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        """Serve in the background (and say where, in the endpoint file)."""
        self._thread.start()
        if self._endpoint_file is not None:
            host = str(self._server.server_address[0])
            host = "127.0.0.1" if host in ("0.0.0.0", "") else host
            tmp = self._endpoint_file.with_name(self._endpoint_file.name + ".tmp")
            tmp.write_text(f"{host}:{self.port}\n", encoding="utf-8")
            tmp.replace(self._endpoint_file)  # a probe never reads half a line
        log.info("operator endpoint listening", extra={"port": self.port})
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if self._endpoint_file is not None:
            self._endpoint_file.unlink(missing_ok=True)

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """(HTTP status, content type, body) for a GET of ``path``."""
        path = path.split("?", 1)[0]
        if path == "/metrics":
            # The 0.0.4 text format: what every Prometheus 2.x scrapes without negotiation.
            return 200, CONTENT_TYPE_PLAIN_0_0_4, self.metrics.exposition()
        probe = self._probes.get(path)
        if probe is None:
            return 404, "text/plain; charset=utf-8", b"not found: try /healthz, /readyz, /metrics\n"
        try:
            ok, why = probe()
        except Exception as e:  # a probe that crashes reports unhealthy, never a 500 page
            ok, why = False, f"probe failed: {type(e).__name__}: {e}"
        body = (f"ok: {why}\n" if ok else f"not ok: {why}\n").encode()
        return (200 if ok else 503), "text/plain; charset=utf-8", body


def _handler(server: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, ctype, body = server.answer(self.path)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # probes every few seconds would flood the operator's log

    return Handler
