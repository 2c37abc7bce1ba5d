"""``qlora submit | status | logs | cancel`` with a job over two nodes, against the test
control plane (the real scheduler and Job controller; the test plays the kubelet).

The control plane is Kubernetes 1.20, older than Indexed Jobs: it drops ``completionMode`` and
does not annotate the pods with their completion index, so the test annotates each pod with
``batch.kubernetes.io/job-completion-index`` as the 1.21+ Job controller would. Everything
else is what a user sees: both pods are listed per rank, ``logs`` prints rank 0's pod and
``--rank 1`` the other's, ``cancel`` deletes the Job, its headless Service and ConfigMap, and
the pods go with the Job (marked for deletion: no kubelet confirms it here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.k8s.status import termination_message
from tests.fixtures.kube import ControlPlane
from tests.test_k8s_submit import job_selector, qlora

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parent.parent
INDEX = "batch.kubernetes.io/job-completion-index"


def two_node_spec(tmp_path: Path) -> Path:
    doc = yaml.safe_load((REPO / "examples" / "llama-3.1-8b.yaml").read_text(encoding="utf-8"))
    doc["metadata"]["name"] = "two-nodes"
    doc["spec"]["resources"] = {"nodes": 2}
    path = tmp_path / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def bound_pods(cp: ControlPlane, ns: str, n: int) -> list[dict[str, Any]]:
    def all_bound() -> list[dict[str, Any]] | None:
        pods = [p for p in cp.pods(ns, job_selector("two-nodes")) if p["spec"].get("nodeName")]
        return pods if len(pods) == n else None

    return list(cp.wait_for(f"{n} bound pods", all_bound, timeout_s=90))


def test_two_pods_listed_per_rank_logs_by_rank_cancel_removes_all(
    kube_control_plane: ControlPlane,
    gpu_nodes: dict[str, str],
    kube_namespace: str,
    tmp_path: Path,
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    sub = qlora(["submit", str(two_node_spec(tmp_path)), "-n", ns], cp.kubeconfig)
    assert sub.returncode == 0, sub.stderr
    assert "service/two-nodes-" in sub.stderr and "job/two-nodes-" in sub.stderr, sub.stderr

    pods = sorted(p["metadata"]["name"] for p in bound_pods(cp, ns, 2))
    for index, pod in enumerate(pods):
        cp.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{pod}",
                   {"metadata": {"annotations": {INDEX: str(index)}}},
                   content_type="application/merge-patch+json")
        cp.play_kubelet(ns, pod, phase="Running")
        cp.kubelet.write(ns, pod, f"node {index} says hello")
        cp.kubelet.close(ns, pod)
    cp.play_kubelet(ns, pods[1], phase="Failed", exit_code=6,
                    message=termination_message(succeeded=False, reason="CUDA out of memory",
                                                exit_code=6))

    status = qlora(["status", "two-nodes", "-n", ns], cp.kubeconfig)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    header = lines.index(next(x for x in lines if x.startswith("RANKS")))
    rank0, rank1 = lines[header + 1], lines[header + 2]
    assert rank0.split()[:3] == ["0", pods[0], "Running"], status.stdout
    assert rank1.split()[:3] == ["1", pods[1], "Failed"], status.stdout
    assert "CUDA out of memory (exit code 6)" in rank1

    logs = qlora(["logs", "two-nodes", "-n", ns], cp.kubeconfig)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.splitlines() == ["node 0 says hello"]
    logs1 = qlora(["logs", "two-nodes", "--rank", "1", "-n", ns], cp.kubeconfig)
    assert logs1.returncode == 0, logs1.stderr
    assert logs1.stdout.splitlines() == ["node 1 says hello"]
    none = qlora(["logs", "two-nodes", "--rank", "2", "-n", ns], cp.kubeconfig)
    assert none.returncode == 8 and "--rank 2" in none.stderr, none.stderr

    cancel = qlora(["cancel", "two-nodes", "-n", ns], cp.kubeconfig)
    assert cancel.returncode == 0, cancel.stderr
    deleted = cancel.stdout
    assert "job/two-nodes-" in deleted and "service/two-nodes-" in deleted, deleted
    assert "configmap/two-nodes-" in deleted
    services = cp.request("GET", f"/api/v1/namespaces/{ns}/services")["items"]
    assert not [s for s in services if s["metadata"]["name"].startswith("two-nodes")]
    # The pods go with their Job (background propagation: the garbage collector deletes them;
    # with no real kubelet to confirm, a deleted pod stays Terminating, marked for deletion).
    cp.wait_for("every pod to be deleted", lambda: all(
        p["metadata"].get("deletionTimestamp") for p in cp.pods(ns, job_selector("two-nodes"))
    ), timeout_s=60)
