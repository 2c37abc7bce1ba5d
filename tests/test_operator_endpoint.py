"""The operator's HTTP endpoint: /healthz, /readyz and /metrics as the kubelet and Prometheus
see them, over a real socket on 127.0.0.1."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from runner.errors import SpecError
from runner.k8s.operator_metrics import HealthServer, OperatorMetrics

pytestmark = pytest.mark.timeout(30)


class Probes:
    def __init__(self) -> None:
        self.alive, self.ready, self.why = True, False, "0 of 3 watches have listed"

    def live(self) -> tuple[bool, str]:
        return self.alive, "alive" if self.alive else "the main loop has not ticked for 130 s"

    def readiness(self) -> tuple[bool, str]:
        return self.ready, self.why


@pytest.fixture()
def served() -> Iterator[tuple[str, Probes, OperatorMetrics]]:
    probes, metrics = Probes(), OperatorMetrics()
    server = HealthServer(metrics, live=probes.live, ready=probes.readiness, port=0,
                          bind_address="127.0.0.1").start()
    yield f"http://127.0.0.1:{server.port}", probes, metrics
    server.stop()


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status), r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.headers["Content-Type"], e.read().decode()


def test_readiness_follows_the_watches_and_a_standby_is_ready(
    served: tuple[str, Probes, OperatorMetrics],
) -> None:
    url, probes, _ = served
    assert get(url + "/readyz")[::2] == (503, "not ok: 0 of 3 watches have listed\n")
    probes.ready, probes.why = True, "standby"
    assert get(url + "/readyz")[::2] == (200, "ok: standby\n")  # rolling updates go on
    assert get(url + "/healthz")[::2] == (200, "ok: alive\n")
    probes.alive = False
    status, _, body = get(url + "/healthz")
    assert status == 503 and "has not ticked" in body


def test_metrics_are_the_operators_own_in_the_text_format(
    served: tuple[str, Probes, OperatorMetrics],
) -> None:
    url, _, metrics = served
    metrics.observe_reconcile(0.03, "ok")
    metrics.observe_reconcile(0.2, "error")
    metrics.leader.set(1)
    metrics.queue_depth.set(7)
    metrics.retries.inc()
    metrics.count_request("GET", "finetunejobs")
    status, ctype, body = get(url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    lines = set(body.splitlines())
    for line in (
        'qlora_operator_reconcile_duration_seconds_bucket{le="0.05",result="ok"} 1.0',
        'qlora_operator_reconcile_duration_seconds_count{result="error"} 1.0',
        "qlora_operator_reconcile_errors_total 1.0",
        "qlora_operator_queue_retries_total 1.0",
        "qlora_operator_queue_depth 7.0",
        "qlora_operator_leader 1.0",
        'qlora_operator_api_requests_total{resource="finetunejobs",verb="GET"} 1.0',
    ):
        assert line in lines, line
    assert "python_gc_objects_collected_total" not in body  # a registry of its own
    assert get(url + "/nothing")[0] == 404


def test_a_taken_port_is_a_settings_error_not_a_traceback() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SpecError, match=f"QLORA_OPERATOR_METRICS_PORT: cannot listen on "
                                            f"127.0.0.1:{port}"):
            HealthServer(OperatorMetrics(), live=lambda: (True, ""), ready=lambda: (True, ""),
                         port=port, bind_address="127.0.0.1")


def test_the_lease_holder_is_named_after_the_pod_not_the_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under hostNetwork every replica's hostname is the node's; the chart passes the pod's
    name (downward API), so `kubectl get lease` says which pod leads."""
    from runner.k8s.controller import default_identity

    monkeypatch.setenv("HOSTNAME", "node-1")
    monkeypatch.setenv("POD_NAME", "ft-qlora-runner-5d9c-abcde")
    a, b = default_identity(), default_identity()
    assert a.rsplit("_", 1)[0] == "ft-qlora-runner-5d9c-abcde" and a != b
    monkeypatch.delenv("POD_NAME")
    assert default_identity().startswith("node-1_")
