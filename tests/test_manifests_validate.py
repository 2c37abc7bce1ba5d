"""Every shipped or rendered Kubernetes object validates against the Kubernetes OpenAPI schemas.

``kubernetes-validate --strict`` (offline, bundled schemas) checks structure, types and
unknown fields for Kubernetes 1.30 and the newest bundled version. It cannot see enum values
or cross-field rules, so :func:`semantic_problems` adds the project's own checks for what
the schema misses: ``podFailurePolicy`` actions and operators, ``restartPolicy: Never``,
integer ``Gt``/``Lt`` affinity values, security context. The test control plane (1.20) does
not know ``podFailurePolicy`` at all, so these checks are the only ones it gets.
"""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from runner.k8s import render_objects
from runner.k8s.operator import LEADER_ELECTION_RULES, RBAC_RULES
from runner.plan import Plan, bundled_config, load_gpu_classes, make_plan
from runner.settings import Settings
from runner.spec import ModelSourceKind, load_spec, validate_document
from tests.conftest import require_binary
from tests.image_refs import has_registry_host, image_refs
from tests.kueue_schema import KUEUE_KINDS, check_kueue

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
SPEC_FILES = [*sorted((REPO / "examples").glob("*.yaml")), MANIFESTS / "example-finetunejob.yaml"]
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
SETTINGS = Settings(s3_endpoint_url="http://s3.storage.svc:8333", pushgateway_url=None)

FAILURE_ACTIONS = {"FailJob", "Ignore", "Count", "FailIndex"}
EXIT_CODE_OPERATORS = {"In", "NotIn"}
POD_CONDITION_STATUSES = {"True", "False", "Unknown"}
# Kinds whose schema kubernetes-validate does not bundle; they get their own checks below.
CUSTOM_KINDS = {"FineTuneJob", "PodMonitor", "ServiceMonitor", *KUEUE_KINDS}
TRAINER_SELECTOR = {
    "app.kubernetes.io/name": "qlora-runner",
    "app.kubernetes.io/component": "trainer",
}


def validate_k8s(obj: dict[str, Any]) -> None:
    """Strict schema validation for every version in :data:`K8S_VERSIONS`."""
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{obj['kind']} {obj['metadata'].get('name')} @ {version}: {where}: {e}")


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") in {"Job", "Deployment", "StatefulSet", "DaemonSet"}:
        return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return None


def semantic_problems(obj: dict[str, Any]) -> list[str]:
    """What the OpenAPI schema cannot catch, as ``path: message`` lines."""
    problems: list[str] = []
    pod = _pod_spec(obj)
    if pod is None:
        return problems
    containers = {c["name"]: c for c in pod["containers"]}
    if obj["kind"] == "Job":
        if pod.get("restartPolicy") != "Never":
            problems.append("spec.template.spec.restartPolicy: must be Never")
        for i, rule in enumerate(obj["spec"].get("podFailurePolicy", {}).get("rules", [])):
            path = f"spec.podFailurePolicy.rules[{i}]"
            if rule.get("action") not in FAILURE_ACTIONS:
                problems.append(f"{path}.action: {rule.get('action')!r} not in {FAILURE_ACTIONS}")
            if ("onExitCodes" in rule) == ("onPodConditions" in rule):
                problems.append(f"{path}: needs exactly one of onExitCodes, onPodConditions")
            codes = rule.get("onExitCodes")
            if codes:
                values = codes.get("values", [])
                if codes.get("operator") not in EXIT_CODE_OPERATORS:
                    problems.append(f"{path}.onExitCodes.operator: {codes.get('operator')!r}")
                if values != sorted(set(values)) or not values or len(values) > 255:
                    problems.append(f"{path}.onExitCodes.values: must be sorted and unique")
                if codes.get("operator") == "In" and 0 in values:
                    problems.append(f"{path}.onExitCodes.values: 0 is not allowed with In")
                if not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
                    problems.append(f"{path}.onExitCodes.values: exit codes are 0-255")
                if codes.get("containerName", next(iter(containers))) not in containers:
                    problems.append(f"{path}.onExitCodes.containerName: no such container")
            for cond in rule.get("onPodConditions", []):
                if cond.get("status") not in POD_CONDITION_STATUSES:
                    problems.append(f"{path}.onPodConditions.status: {cond.get('status')!r}")
    node_affinity = pod.get("affinity", {}).get("nodeAffinity", {})
    required = node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {})
    for t, term in enumerate(required.get("nodeSelectorTerms", [])):
        for e, expr in enumerate(term.get("matchExpressions", [])):
            path = f"affinity...nodeSelectorTerms[{t}].matchExpressions[{e}]"
            if expr["operator"] in {"Gt", "Lt"}:
                values = expr.get("values", [])
                if len(values) != 1 or not str(values[0]).lstrip("-").isdigit():
                    problems.append(f"{path}.values: Gt/Lt need one integer, got {values}")
    for name, c in containers.items():
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"containers[{name}].securityContext.allowPrivilegeEscalation")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"containers[{name}].securityContext.readOnlyRootFilesystem")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"containers[{name}].securityContext.capabilities.drop: ALL")
        for env in c.get("env", []):
            if env["name"].startswith("AWS_") and "SECRET" in env["name"] and "value" in env:
                problems.append(f"containers[{name}].env[{env['name']}]: use secretKeyRef")
    if pod.get("securityContext", {}).get("runAsNonRoot") is not True:
        problems.append("spec.template.spec.securityContext.runAsNonRoot: must be true")
    return problems


def check(obj: dict[str, Any]) -> None:
    validate_k8s(obj)
    assert semantic_problems(obj) == []


# --- rendered objects --------------------------------------------------------------------


def plan_for(path: Path) -> Plan:
    """The real planner's plan.

    The model's config.json must be readable offline: s3:// models (no store here) use the
    bundled 8B shape, and a local model directory that is not built yet (the CPU demo's tiny
    model) the bundled 1B shape.
    """
    spec = load_spec(path)
    source = spec.spec.model
    shape = None
    if source.source_kind is ModelSourceKind.S3:
        shape = "llama-3.1-8b"
    elif source.source_kind is ModelSourceKind.LOCAL and not Path(source.source).exists():
        shape = "llama-3.2-1b"
    if shape is None:
        return make_plan(spec, SETTINGS)
    found = bundled_config(shape)
    assert found is not None
    return make_plan(spec, SETTINGS, model_config=found.config)


def rendered(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Objects for ``path`` with its real plan, then moved to every class, queued and owned."""
    spec = load_spec(path)
    plan = plan_for(path)
    for obj in render_objects(spec, plan, SETTINGS):
        yield "planned", obj
    for gpu in load_gpu_classes(SETTINGS).classes:
        for obj in render_objects(spec, replace(plan, gpu_class=gpu), SETTINGS):
            yield f"class-{gpu.name}", obj
    owner = {
        "apiVersion": "qlora-runner.io/v1alpha1",
        "kind": "FineTuneJob",
        "name": "x",
        "uid": "u",
    }
    for obj in render_objects(spec, plan, SETTINGS, queue_name="team-a", owner=owner, attempt=2):
        yield "queued-owned", obj


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_rendered_objects_validate(path: Path) -> None:
    seen = set()
    for variant, obj in rendered(path):
        seen.add(obj["kind"])
        try:
            check(obj)
        except AssertionError as e:
            raise AssertionError(f"{variant}: {e}") from e
    assert seen == {"ConfigMap", "Job"}


def test_semantic_checks_catch_what_the_schema_misses() -> None:
    spec_path = MANIFESTS / "example-finetunejob.yaml"
    _, job = render_objects(load_spec(spec_path), plan_for(spec_path), SETTINGS)
    bad = copy.deepcopy(job)
    bad["spec"]["podFailurePolicy"]["rules"][1]["action"] = "Explode"
    bad["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"] = [6, 2]
    bad["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    expr = bad["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"][0]["matchExpressions"][0]
    expr["values"] = ["22.5Gi"]
    for version in K8S_VERSIONS:  # the schema alone lets all of this through
        kubernetes_validate.validate(bad, version, strict=True)
    problems = "\n".join(semantic_problems(bad))
    for fragment in ("Explode", "sorted", "restartPolicy", "one integer"):
        assert fragment in problems
    typo = copy.deepcopy(job)
    typo["spec"]["podFailurPolicy"] = typo["spec"].pop("podFailurePolicy")
    with pytest.raises(kubernetes_validate.ValidationError):  # strict mode sees typos
        kubernetes_validate.validate(typo, K8S_VERSIONS[0], strict=True)


# --- manifests/ --------------------------------------------------------------------------


def manifest_docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for f in sorted(MANIFESTS.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        for i, doc in enumerate(yaml.safe_load_all(f.read_text(encoding="utf-8"))):
            if doc is not None:
                out.append((f"{f.name}#{i}", doc))
    return out


@pytest.mark.parametrize(
    ("where", "doc"), manifest_docs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_manifest_validates(where: str, doc: dict[str, Any]) -> None:
    if doc["kind"] in CUSTOM_KINDS:
        check_custom(doc)
    else:
        check(doc)


def check_custom(doc: dict[str, Any]) -> None:
    """Custom resources: FineTuneJob through the spec model, monitors by shape."""
    if doc["kind"] == "FineTuneJob":
        validate_document(doc)
    elif doc["kind"] in KUEUE_KINDS:  # Kueue's CRDs are not at hand: a strict schema of ours
        check_kueue(doc)
    else:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        selector = doc["spec"]["selector"]["matchLabels"]
        if doc["kind"] == "PodMonitor" and selector.get(COMPONENT) != "operator":
            assert selector == TRAINER_SELECTOR  # the labels every rendered training pod carries
        assert selector
        endpoints = doc["spec"].get("podMetricsEndpoints") or doc["spec"].get("endpoints")
        assert endpoints and all(e["port"] for e in endpoints)


COMPONENT = "app.kubernetes.io/component"


def test_operator_probes_and_monitor_use_its_endpoint() -> None:
    """The Deployment's probes, its port and the operator PodMonitor agree on one endpoint."""
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in manifest_docs()}
    deploy = docs[("Deployment", "qlora-operator")]
    check_operator_endpoint(deploy, docs[("PodMonitor", "qlora-operator")])


def check_operator_endpoint(deploy: dict[str, Any], monitor: dict[str, Any] | None) -> None:
    """Probes on /healthz and /readyz of the named port QLORA_OPERATOR_METRICS_PORT sets."""
    pod = deploy["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    (port,) = container["ports"]
    assert int(env["QLORA_OPERATOR_METRICS_PORT"]) == port["containerPort"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    if monitor is not None:
        assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"][
            "labels"].items()
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")


def test_manifests_hold_no_secret_values() -> None:
    for where, doc in manifest_docs():
        if doc["kind"] == "Secret":
            values = {**doc.get("stringData", {}), **doc.get("data", {})}
            assert set(values) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, where
            assert all(v == "" for v in values.values()), f"{where}: a template holds no values"


def test_manifests_name_no_registry_host() -> None:
    refs = []
    for f in MANIFESTS.glob("*.yaml"):
        refs += [(f.name, r) for r in image_refs(f.read_text(encoding="utf-8"))]
    assert refs, "no image reference found in manifests/: the test would be vacuous"
    assert not [(n, r) for n, r in refs if has_registry_host(r)], refs


def test_operator_service_account_matches_rbac() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in manifest_docs()}
    deploy = docs[("Deployment", "qlora-operator")]
    sa = deploy["spec"]["template"]["spec"]["serviceAccountName"]
    binding = docs[("RoleBinding", "qlora-operator")]
    assert {"kind": "ServiceAccount", "name": sa, "namespace": "qlora"} in binding["subjects"]
    assert ("ServiceAccount", sa) in docs
    rules = docs[("Role", binding["roleRef"]["name"])]["rules"]
    declared = [{"apiGroups": [g], "resources": [r], "verbs": list(v)} for g, r, v in RBAC_RULES]
    declared += [{"apiGroups": [g], "resources": [r], "verbs": list(v),
                  **({"resourceNames": list(n)} if n else {})}
                 for g, r, v, n in LEADER_ELECTION_RULES]
    canon = sorted(json.dumps(r, sort_keys=True) for r in rules)
    assert canon == sorted(json.dumps(r, sort_keys=True) for r in declared), (
        "manifests/rbac.yaml must grant exactly runner.k8s.operator.RBAC_RULES and "
        "LEADER_ELECTION_RULES")


def rbac_grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """Every (group, resource, verb) a list of RBAC rules grants; no wildcards allowed."""
    out = {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert all("*" not in part for grant in out for part in grant), "no wildcards"
    return out


def test_kustomization_builds_and_validates() -> None:

    kubectl = require_binary("kubectl")
    out = subprocess.run(
        [kubectl, "kustomize", str(MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert {d["kind"] for d in docs} == {
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
    }
    for d in docs:
        check(d)
