"""The operator's ServiceAccount can do exactly what the operator needs, checked with
impersonation against the real RBAC authorizer of the test API server.

1. The rules the operator declares (``runner.k8s.operator.RBAC_RULES``) are enough: a whole
   reconcile (plan, create ConfigMap + Job, mirror the finished Job into status) runs as a
   ServiceAccount bound to nothing else.
2. ``manifests/`` grants the operator's ServiceAccount those rules and no more: its
   SelfSubjectRulesReview in the operator's namespace equals the declared table, other
   namespaces are out of reach, and a list of things it must never do is denied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.k8s import names
from runner.k8s.client import KubeClient, load_client
from runner.k8s.operator import LEADER_ELECTION_RULES, RBAC_RULES, Operator
from runner.k8s.status import termination_message
from runner.settings import Settings
from tests.fixtures.kube import ControlPlane
from tests.test_k8s_operator import crd, example, ftj_path  # noqa: F401 - fixture reuse

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
PLURALS = {
    "Namespace": "/api/v1/namespaces",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
}
NEVER = [  # (verb, group, resource, subresource) the operator must not be able to do
    ("get", "", "secrets", ""),
    ("list", "", "secrets", ""),
    ("create", "", "pods", ""),
    ("delete", "", "pods", ""),
    ("create", "", "pods", "exec"),
    ("create", "qlora-runner.io", "finetunejobs", ""),
    ("delete", "qlora-runner.io", "finetunejobs", ""),
    ("update", "qlora-runner.io", "finetunejobs", ""),
    ("list", "", "nodes", ""),
    ("create", "rbac.authorization.k8s.io", "rolebindings", ""),
    ("create", "apiextensions.k8s.io", "customresourcedefinitions", ""),
    ("update", "batch", "jobs", ""),
]


def _user(ns: str, sa: str) -> str:
    return f"system:serviceaccount:{ns}:{sa}"


def _as(cp: ControlPlane, user: str) -> KubeClient:
    """A client for the admin kubeconfig that impersonates ``user``."""
    return load_client(str(cp.kubeconfig), impersonate=user)


def _can(cp: ControlPlane, user: str, ns: str, verb: str, group: str, resource: str,
         sub: str = "") -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"namespace": ns, "verb": verb, "group": group,
                                        "resource": resource, "subresource": sub}},
    }
    out = cp.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review,
                     headers={"Impersonate-User": user})
    return bool(out["status"].get("allowed"))


def _granted(cp: ControlPlane, user: str, ns: str) -> set[tuple[str, str, str]]:
    """(group, resource, verb) the user may use in ``ns``, minus what every user may."""
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
              "spec": {"namespace": ns}}
    out = cp.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews", review,
                     headers={"Impersonate-User": user})
    found = set()
    for rule in out["status"]["resourceRules"]:
        for g in rule.get("apiGroups", []):
            for r in rule.get("resources", []):
                for v in rule.get("verbs", []):
                    found.add((g, r, v))
    # Granted to every authenticated user by the default bootstrap policy.
    return {t for t in found if t[0] != "authorization.k8s.io"}


def _declared() -> set[tuple[str, str, str]]:
    return {(g, r, v) for g, r, verbs in RBAC_RULES for v in verbs} | {
        (g, r, v) for g, r, verbs, _ in LEADER_ELECTION_RULES for v in verbs}


def _can_lease(cp: ControlPlane, user: str, ns: str, verb: str, name: str = "") -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"namespace": ns, "verb": verb,
                                        "group": "coordination.k8s.io", "resource": "leases",
                                        "name": name}},
    }
    out = cp.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review,
                     headers={"Impersonate-User": user})
    return bool(out["status"].get("allowed"))


def _reconcile_to_success(cp: ControlPlane, api: KubeClient, ns: str, name: str) -> None:
    cp.request("POST", ftj_path(ns), example(name))
    op = Operator(api, Settings(), namespace=ns)
    op.reconcile_all()
    st = cp.request("GET", ftj_path(ns, name))["status"]
    assert st["phase"] == "Planned", st
    pod = cp.wait_for_bound_pod(ns, f"{names.LABEL_JOB}={name}")
    cp.play_kubelet(ns, pod["metadata"]["name"], phase="Succeeded",
                    message=termination_message(succeeded=True, adapter_uri="file:///a"))
    cp.wait_for("the job to complete", lambda: any(
        c["type"] == "Complete" for c in (cp.request(
            "GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{st['jobName']}"
        ).get("status") or {}).get("conditions", [])), timeout_s=60)
    op.reconcile_all()
    assert cp.request("GET", ftj_path(ns, name))["status"]["phase"] == "Succeeded"


def _grant_operator_rules(cp: ControlPlane, ns: str) -> None:
    """Bind exactly the operator's declared RBAC_RULES to the ServiceAccount ``op`` in ``ns``."""
    role: dict[str, Any] = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "op", "namespace": ns},
        "rules": [{"apiGroups": [g], "resources": [r], "verbs": list(v)} for g, r, v in RBAC_RULES],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "op", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "op"},
        "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": ns}],
    }
    cp.apply_file_objects([role, binding], PLURALS)


def test_the_declared_rules_are_enough_for_a_whole_reconcile(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], crd: None,  # noqa: F811
    kube_namespace: str,
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    _grant_operator_rules(cp, ns)
    api = _as(cp, _user(ns, "op"))
    _reconcile_to_success(cp, api, ns, "rbac-enough")

    # A pod exit the rendered podFailurePolicy fails the Job on: this 1.20 API server has no
    # podFailurePolicy, so the operator stops the Job itself, by patch (no update on Jobs).
    cp.request("POST", ftj_path(ns), example("rbac-bad"))
    op = Operator(api, Settings(), namespace=ns)
    op.reconcile_all()
    pod = cp.wait_for_bound_pod(ns, f"{names.LABEL_JOB}=rbac-bad")
    cp.play_kubelet(ns, pod["metadata"]["name"], phase="Failed", exit_code=2,
                    message=termination_message(succeeded=False, exit_code=2,
                                                reason="dataset.sources[0]: 0 rows"))
    op.reconcile_all()
    st = cp.request("GET", ftj_path(ns, "rbac-bad"))["status"]
    assert (st["phase"], st["reason"]) == ("Failed", "PodFailurePolicy"), st
    job = cp.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{st['jobName']}")
    assert job["spec"]["activeDeadlineSeconds"] == 1


def test_the_declared_rules_create_a_two_node_jobs_headless_service(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], crd: None,  # noqa: F811
    kube_namespace: str,
) -> None:
    """resources.nodes: 2 renders a Service too: the operator's rules must cover it."""
    cp, ns = kube_control_plane, kube_namespace
    _grant_operator_rules(cp, ns)
    doc = example("rbac-two-nodes")
    doc["spec"]["resources"] = {"nodes": 2}
    cp.request("POST", ftj_path(ns), doc)
    Operator(_as(cp, _user(ns, "op")), Settings(), namespace=ns).reconcile_all()
    st = cp.request("GET", ftj_path(ns, "rbac-two-nodes"))["status"]
    assert st["phase"] == "Planned", st
    svc = cp.request("GET", f"/api/v1/namespaces/{ns}/services/{st['jobName']}")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"


def test_manifests_grant_the_operator_exactly_the_declared_rules(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], crd: None,  # noqa: F811
) -> None:
    cp = kube_control_plane
    docs = []
    for f in ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml"):
        docs += [d for d in yaml.safe_load_all((MANIFESTS / f).read_text()) if d]
    cp.apply_file_objects(docs, PLURALS)
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    ns, user = sa["metadata"]["namespace"], _user(sa["metadata"]["namespace"],
                                                  sa["metadata"]["name"])

    granted, declared = _granted(cp, user, ns), _declared()
    assert granted == declared, (
        f"manifests/rbac.yaml grants more than the operator uses: {sorted(granted - declared)}; "
        f"and lacks: {sorted(declared - granted)}"
    )
    other = cp.create_namespace("other")
    assert not _can(cp, user, other, "list", "batch", "jobs"), (
        "the operator watches only its own namespace; bind a Role there, not a ClusterRole")
    allowed = [n for n in NEVER if _can(cp, user, ns, *n)]
    assert allowed == []
    # Leader election: exactly get, create and update, get/update only of its own Lease.
    lease = LEADER_ELECTION_RULES[1][3][0]
    assert [v for v in ("get", "update", "create") if _can_lease(cp, user, ns, v, lease)] == [
        "get", "update", "create"]
    assert not _can_lease(cp, user, ns, "get", "someone-elses-lease")
    assert not _can_lease(cp, user, ns, "update", "someone-elses-lease")
    assert [v for v in ("list", "watch", "patch", "delete", "deletecollection")
            if _can_lease(cp, user, ns, v, lease)] == []
    assert not _can_lease(cp, user, other, "create")
    # And the real thing, as that ServiceAccount: a whole reconcile in its namespace.
    try:
        _reconcile_to_success(cp, _as(cp, user), ns, "rbac-manifests")
    finally:
        cp.clear_namespace(ns)
