"""The Helm chart: every ``ci/*-values.yaml`` lints strictly, renders, and validates.

Rendered objects go through the same checks as ``manifests/`` (kubernetes-validate strict
for 1.30 and the newest bundled version, plus the project's own checks); the values schema
must reject what the operator could not use.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.k8s.crd import crd_manifest
from runner.plan import parse_gpu_classes
from runner.settings import Settings
from tests.conftest import require_binary
from tests.image_refs import has_registry_host, image_refs
from tests.test_manifests_validate import (
    CUSTOM_KINDS,
    TRAINER_SELECTOR,
    check,
    check_custom,
    check_operator_endpoint,
    rbac_grants,
)

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "qlora-runner"
VARIANTS = sorted((CHART / "ci").glob("*-values.yaml"))


def helm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    binary = require_binary("helm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    env["KUBECONFIG"] = os.devnull
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )


def template(*values: str, release: str = "ft", namespace: str = "ml") -> list[dict[str, Any]]:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for v in values:
        args += ["-f", v]
    out = helm(*args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    (deploy,) = by_kind(docs)["Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in container["env"]}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda p: p.name)
def test_lint_strict(variant: Path) -> None:
    out = helm("lint", "--strict", str(CHART), "-f", str(variant))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda p: p.name)
def test_template_validates(variant: Path) -> None:
    docs = template(str(variant))
    assert "Deployment" in by_kind(docs)
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63, name
        if doc["kind"] in CUSTOM_KINDS:
            check_custom(doc)
        else:
            check(doc)
        assert doc["kind"] != "Secret", "the chart never holds credentials"


def settings_from(env: dict[str, str]) -> Settings:
    """Settings as the operator would load them from its environment."""
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("QLORA_"):
                mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        return Settings()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda p: p.name)
def test_operator_settings_are_real_settings(variant: Path) -> None:
    docs = template(str(variant))
    env = operator_env(docs)
    known = {f"QLORA_{name.upper()}" for name in Settings.model_fields}
    values = yaml.safe_load(variant.read_text(encoding="utf-8")) or {}
    extra = {e["name"] for e in values.get("operator", {}).get("extraEnv", [])}
    unknown = {k for k in env if k.startswith("QLORA_")} - known - extra
    assert not unknown, f"not a Settings field: {unknown}"
    for key in ("QLORA_NAMESPACE", "QLORA_IMAGE", "QLORA_GPU_CLASSES_FILE", "QLORA_S3_SECRET_NAME"):
        assert env[key]
    # The planner reads the model's config.json from S3, so the operator gets the training
    # pods' Secret too, never a literal value, and starts without it (optional).
    (deploy,) = by_kind(docs)["Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    creds = {e["name"]: e for e in container["env"] if e["name"].startswith("AWS_")}
    assert set(creds) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for key, e in creds.items():
        assert "value" not in e and e["valueFrom"]["secretKeyRef"] == {
            "name": values.get("s3", {}).get("secretName", "qlora-s3"), "key": key,
            "optional": True}
    settings = settings_from(env)  # and the operator can parse every value
    assert settings.image == env["QLORA_IMAGE"]
    pull = values.get("imagePullSecrets", [])
    assert settings.image_pull_secrets == [p["name"] for p in pull]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda p: p.name)
def test_gpu_class_config_map_is_a_valid_class_table(variant: Path) -> None:
    docs = template(str(variant))
    (cm,) = [d for d in by_kind(docs)["ConfigMap"] if d["metadata"]["name"].endswith("-classes")]
    table = parse_gpu_classes(yaml.safe_load(cm["data"]["gpu_classes.yaml"]), "chart")
    assert table.classes
    env = operator_env(docs)
    (deploy,) = by_kind(docs)["Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "gpu-classes")
    assert env["QLORA_GPU_CLASSES_FILE"] == f"{mount['mountPath']}/gpu_classes.yaml"
    volume = next(v for v in pod["volumes"] if v["name"] == "gpu-classes")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]


def test_default_class_table_is_the_bundled_one() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    bundled = yaml.safe_load((REPO / "runner" / "data" / "gpu_classes.yaml").read_text("utf-8"))
    assert values["gpuClasses"] == bundled, "values.yaml gpuClasses drifted from the bundled table"


def test_templated_crd_is_the_generated_one() -> None:
    (crd,) = by_kind(template())["CustomResourceDefinition"]
    generated = crd_manifest()
    assert crd["spec"] == generated["spec"]
    assert crd["metadata"]["name"] == generated["metadata"]["name"]
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def _operator_roles(docs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [r for r in docs.get("Role", []) if not r["metadata"]["name"].endswith("-election")]


def test_rbac_scope_follows_watch_all_namespaces(tmp_path: Path) -> None:
    namespaced = by_kind(template())
    (role,) = _operator_roles(namespaced)
    assert role["metadata"]["namespace"] == "ml"
    assert "ClusterRole" not in namespaced
    cluster = by_kind(template(str(CHART / "ci" / "cluster-wide-values.yaml")))
    assert not _operator_roles(cluster) and "ClusterRole" in cluster
    (deploy,) = cluster["Deployment"]
    assert "--all-namespaces" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    (binding,) = cluster["ClusterRoleBinding"]
    (sa,) = cluster["ServiceAccount"]
    assert binding["subjects"][0]["name"] == sa["metadata"]["name"]
    rules = role["rules"]
    verbs = {(r, v) for rule in rules for r in rule["resources"] for v in rule["verbs"]}
    assert ("secrets", "get") not in verbs and not any(r == "secrets" for r, _ in verbs)
    assert ("finetunejobs/status", "patch") in verbs and ("finetunejobs", "patch") not in verbs


def test_monitors_select_the_training_pods() -> None:
    docs = by_kind(template(str(CHART / "ci" / "cluster-wide-values.yaml")))
    service = next(d for d in docs["Service"] if d["metadata"]["name"].endswith("trainer"))
    monitor = next(d for d in docs["ServiceMonitor"] if d["metadata"]["name"].endswith("trainer"))
    assert service["spec"]["selector"] == TRAINER_SELECTOR
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    pod_monitor = next(d for d in docs["PodMonitor"] if d["metadata"]["name"].endswith("trainer"))
    assert pod_monitor["spec"]["selector"]["matchLabels"] == TRAINER_SELECTOR
    assert pod_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda p: p.name)
def test_operator_endpoint_is_probed_and_scraped(variant: Path) -> None:
    docs = by_kind(template(str(variant)))
    (deploy,) = docs["Deployment"]
    monitors = [d for d in docs.get("PodMonitor", []) if d["metadata"]["name"].endswith("operator")]
    check_operator_endpoint(deploy, monitors[0] if monitors else None)
    for svc in docs.get("Service", []):
        if svc["metadata"]["name"].endswith("-operator"):  # what the ServiceMonitor scrapes
            assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"][
                "labels"].items()
            assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_manifests_and_chart_grant_the_same_rules() -> None:
    chart = by_kind(template())
    chart_rules = [rule for role in chart["Role"] for rule in role["rules"]]
    docs = yaml.safe_load_all((REPO / "manifests" / "rbac.yaml").read_text(encoding="utf-8"))
    plain_role = next(d for d in docs if d["kind"] == "Role")
    assert rbac_grants(chart_rules) == rbac_grants(plain_role["rules"])
    cluster = by_kind(template(str(CHART / "ci" / "cluster-wide-values.yaml")))
    cluster_rules = cluster["ClusterRole"][0]["rules"] + cluster["Role"][0]["rules"]
    assert rbac_grants(cluster_rules) == rbac_grants(plain_role["rules"])


def test_leader_election_and_tenants() -> None:
    """Two replicas by default, each Lease verb limited to the release's Lease, and a
    namespace-scoped install with a Role per tenant namespace and no ClusterRole."""
    docs = by_kind(template())
    (deploy,) = docs["Deployment"]
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    env = operator_env(template())
    (election,) = [r for r in docs["Role"] if r["metadata"]["name"].endswith("-election")]
    assert election["metadata"]["namespace"] == "ml" == env["QLORA_OPERATOR_LEASE_NAMESPACE"]
    cluster_env = operator_env(template(str(CHART / "ci" / "cluster-wide-values.yaml")))
    assert cluster_env["QLORA_OPERATOR_LEASE_NAMESPACE"] == "ml" != cluster_env["QLORA_NAMESPACE"]
    named = [r for r in election["rules"] if r.get("resourceNames")]
    assert named == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                      "resourceNames": [env["QLORA_OPERATOR_LEASE_NAME"]],
                      "verbs": ["get", "update"]}]
    tenants = by_kind(template(str(CHART / "ci" / "tenants-values.yaml")))
    assert "ClusterRole" not in tenants
    assert sorted(r["metadata"]["namespace"] for r in _operator_roles(tenants)) == [
        "team-a", "team-b"]
    bindings = [b for b in tenants["RoleBinding"] if not b["metadata"]["name"].endswith(
        "-election")]
    assert {b["subjects"][0]["namespace"] for b in bindings} == {"ml"}
    settings = settings_from(operator_env(template(str(CHART / "ci" / "tenants-values.yaml"))))
    assert settings.operator_namespaces == ["team-a", "team-b"]


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ("unknownKey: 1\n", "unknownKey"),
        ("gpuClasses: {classes: [{name: 24GB, min_memory_mib: big}]}\n", "min_memory_mib"),
        ("gpuClasses: {classes: []}\n", "classes"),
        ("image: {repository: ''}\n", "repository"),
        ("s3: {addressingStyle: sideways}\n", "addressingStyle"),
        ("podMonitor: {enabled: yes-please}\n", "enabled"),
    ],
    ids=["unknown-key", "bad-class", "no-classes", "empty-image", "bad-style", "bad-bool"],
)
def test_values_schema_rejects(tmp_path: Path, values: str, fragment: str) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text(values, encoding="utf-8")
    out = helm("template", "x", str(CHART), "-f", str(bad))
    assert out.returncode != 0
    assert fragment in out.stderr


def test_notes_print_next_commands() -> None:
    out = helm("install", "ft", str(CHART), "--namespace", "ml", "--dry-run=client")
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n ml create secret generic qlora-s3" in notes
    assert "rollout status deployment/ft-qlora-runner" in notes
    assert "get finetunejobs" in notes


def test_no_registry_host_in_the_chart() -> None:
    refs = []
    for f in CHART.rglob("*.yaml"):
        refs += [(f.name, r) for r in image_refs(f.read_text(encoding="utf-8"))]
    assert any(name == "values.yaml" for name, _ in refs), "values.yaml names no image"
    assert not [(n, r) for n, r in refs if has_registry_host(r)], refs


def _free_run(n: int) -> int:
    """A port p with p .. p+n-1 all free on 127.0.0.1 right now."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise AssertionError("no run of free ports")


def test_host_network_replicas_share_a_node_and_each_is_probed_on_its_own_port(
    tmp_path: Path,
) -> None:
    """Under hostNetwork a declared container port is a hostPort, and the scheduler puts no
    two pods with one hostPort on a node: the standby (and a rolling update's surge pod)
    would stay Pending. So the chart declares none; each replica binds the first free port
    from operator.port on and the rendered exec probe asks the one its own pod wrote down."""
    import sys

    from runner.k8s.operator_metrics import HealthServer, OperatorMetrics

    values = tmp_path / "values.yaml"
    base = _free_run(3)
    values.write_text(f"operator: {{hostNetwork: true, port: {base}, "
                      "bindAddress: 127.0.0.1}\n", encoding="utf-8")
    rendered = template(str(values))
    check(next(d for d in rendered if d["kind"] == "Deployment"))  # the exec probes validate
    docs = by_kind(rendered)
    (deploy,) = docs["Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["hostNetwork"] is True and "ports" not in container
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    settings = settings_from(env)
    assert settings.operator_metrics_port_tries == deploy["spec"]["replicas"] + 1 == 3
    probes = {p: container[p]["exec"]["command"] for p in ("livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"][-1] == "/readyz" and probes["livenessProbe"][-1] == "/healthz"
    file_arg = settings.operator_endpoint_file
    assert file_arg and probes["readinessProbe"][-2] == file_arg

    # Two replicas on one network namespace, as the chart starts them (each pod's /tmp is its
    # own emptyDir: here two files).
    state = {"a": (True, "leader"), "b": (False, "0 of 4 watches have listed")}
    servers = []

    def readiness(name: str) -> Callable[[], tuple[bool, str]]:
        return lambda: state[name]

    try:
        for name in ("a", "b"):
            servers.append(HealthServer(
                OperatorMetrics(), live=lambda: (True, "alive"),
                ready=readiness(name), port=settings.operator_metrics_port,
                bind_address=settings.operator_bind_address,
                port_tries=settings.operator_metrics_port_tries,
                endpoint_file=str(tmp_path / f"endpoint-{name}")).start())
        assert servers[0].port == base and servers[1].port == base + 1

        def probe(kind: str, name: str) -> int:
            cmd = [sys.executable if c == "python3" else c for c in probes[kind]]
            cmd[-2] = str(tmp_path / f"endpoint-{name}")
            return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode

        assert (probe("readinessProbe", "a"), probe("readinessProbe", "b")) == (0, 1)
        assert (probe("livenessProbe", "a"), probe("livenessProbe", "b")) == (0, 0)
        state["b"] = (True, "standby")
        assert probe("readinessProbe", "b") == 0
        servers.pop(0).stop()  # a stopped replica's file is gone: its probe fails
        assert probe("livenessProbe", "a") != 0
    finally:
        for s in servers:
            s.stop()


def test_manifests_default_to_two_replicas_named_by_pod() -> None:
    """The plain manifests match the chart: two replicas, rolling with none unavailable, the
    Lease holder named after its pod."""
    docs = list(yaml.safe_load_all((REPO / "manifests" / "operator.yaml").read_text("utf-8")))
    for deploy in (next(d for d in docs if d and d["kind"] == "Deployment"),
                   by_kind(template())["Deployment"][0]):
        assert deploy["spec"]["replicas"] == 2
        assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        (container,) = deploy["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
