"""The Kubernetes adapter against a real kube-apiserver: apply, idempotency, watch, old-server
field dropping, and the messages a user sees for 403 / 404 / 422 / unreachable."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest

from runner.errors import ExitCode, KubernetesError
from runner.k8s.api import CONFIGMAPS, JOBS, NotFoundError
from runner.k8s.client import KubeClient, load_client
from tests.fixtures.kube import ControlPlane

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture()
def api(kube_control_plane: ControlPlane) -> KubeClient:
    return load_client(str(kube_control_plane.kubeconfig))


def _configmap(ns: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns}, "data": data}


def _job(ns: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "backoffLimit": 0,
            "suspend": True,
            "podFailurePolicy": {"rules": [{"action": "FailJob",
                                            "onExitCodes": {"operator": "In", "values": [2]}}]},
            "template": {"spec": {"restartPolicy": "Never",
                                  "containers": [{"name": "c", "image": "busybox:1"}]}},
        },
    }


def test_apply_is_idempotent_and_get_list_delete(api: KubeClient, kube_namespace: str) -> None:
    first = api.apply(_configmap(kube_namespace, "a", {"k": "v"}))
    again = api.apply(_configmap(kube_namespace, "a", {"k": "v"}))
    assert again["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    changed = api.apply(_configmap(kube_namespace, "a", {"k": "w"}))
    assert changed["data"] == {"k": "w"}
    items, rv = api.list_objects(CONFIGMAPS, kube_namespace)
    assert [i["metadata"]["name"] for i in items if i["metadata"]["name"] == "a"] == ["a"]
    assert rv
    assert api.get(CONFIGMAPS, kube_namespace, "missing") is None
    assert api.delete(CONFIGMAPS, kube_namespace, "a") is True
    assert api.delete(CONFIGMAPS, kube_namespace, "a") is False


def test_fields_newer_than_the_server_are_dropped_with_a_warning(
    api: KubeClient, kube_namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert api.server_minor() == 20
    with caplog.at_level(logging.WARNING, logger="runner.k8s.client"):
        live = api.apply(_job(kube_namespace, "j"))
    assert "podFailurePolicy" not in live["spec"]
    assert live["spec"]["backoffLimit"] == 0
    assert "spec.podFailurePolicy" in caplog.text and "spec.suspend" in caplog.text


def test_watch_sees_changes(api: KubeClient, kube_namespace: str) -> None:
    _, rv = api.list_objects(CONFIGMAPS, kube_namespace)
    api.apply(_configmap(kube_namespace, "w", {"k": "1"}))
    events = []
    for etype, obj in api.watch(CONFIGMAPS, kube_namespace, resource_version=rv, timeout_s=2):
        events.append((etype, obj["metadata"]["name"]))
        if etype == "ADDED":
            break
    assert ("ADDED", "w") in events


def test_forbidden_names_the_verb_and_resource(
    kube_control_plane: ControlPlane, kube_namespace: str
) -> None:
    nobody = load_client(str(kube_control_plane.kubeconfig_for(
        kube_control_plane.nobody_token, "nobody")))
    with pytest.raises(KubernetesError) as e:
        nobody.apply(_job(kube_namespace, "x"))
    msg = e.value.message
    assert e.value.exit_code == ExitCode.KUBERNETES
    assert "forbidden (403)" in msg and f"job {kube_namespace}/x" in msg
    assert "'patch' jobs in API group 'batch'" in msg


def test_not_found_and_invalid(api: KubeClient, kube_namespace: str) -> None:
    with pytest.raises(NotFoundError, match="namespace"):
        api.apply(_configmap("no-such-namespace", "a", {}))
    bad = _job(kube_namespace, "bad")
    bad["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    with pytest.raises(KubernetesError) as e:
        api.apply(bad)
    assert "rejected as invalid (422)" in e.value.message
    assert any("restartPolicy" in d for d in e.value.details)
    assert api.get(JOBS, kube_namespace, "bad") is None


def test_unreachable_server_is_a_clear_error(kube_control_plane: ControlPlane) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = kube_control_plane.kubeconfig_for(kube_control_plane.admin_token, "dead")
    cfg.write_text(cfg.read_text().replace(kube_control_plane.url, f"https://127.0.0.1:{port}"))
    client = load_client(str(cfg))
    with pytest.raises(KubernetesError, match="cannot reach the Kubernetes API at https://127"):
        client.get(CONFIGMAPS, "default", "x")


def test_bad_kubeconfig_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(KubernetesError, match="no usable Kubernetes configuration"):
        load_client(str(tmp_path / "missing.yaml"))


def test_a_missing_crd_or_namespace_names_the_fix(api: KubeClient, kube_namespace: str) -> None:
    from runner.k8s.api import Resource

    # A version no CRD serves: independent of whether another test installed the CRD.
    unserved = Resource("qlora-runner.io/v1alpha99", "FineTuneJob", "finetunejobs")
    with pytest.raises(NotFoundError, match="CRD is not installed"):
        api.list_objects(unserved, kube_namespace)
    with pytest.raises(NotFoundError, match="create the namespace or pass --namespace"):
        api.apply(_configmap("no-such-namespace", "a", {}))
