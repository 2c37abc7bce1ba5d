"""The operator as a platform team runs it, on the real one-node cluster
(tests/fixtures/cluster.py: containerd, kubelet and the image of this tree): the chart's two
replicas on one node's network (the standby really runs), ``kubectl delete pod`` of the
leader, ``kill -9`` of the leader's process, and ``helm upgrade`` of the running operator
while FineTuneJobs are being created, with ``qlora status -A`` during that burst.

The FineTuneJobs ask for the 80GB class and the node is a 24 GB one, so their pods stay
Pending: these tests are about the operator, not training, and run no training container.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.k8s import names
from tests.conftest import REPO
from tests.fixtures.cluster import Cluster, helm, kubectl, remove_kept_crd
from tests.test_helm import _free_run
from tests.test_k8s_operator import example, ftj_path

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

RELEASE = "ft"
LEASE_S, RENEW_S, RETRY_S = 6.0, 4.0, 1.0  # the defaults' shape (15/10/2), quicker
RECONCILE_S = 10.0  # one reconcile of a new FineTuneJob on a loaded 2-core machine, at most
OPERATOR = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"


@dataclass
class Release:
    ns: str
    lease: str
    values: Path


def _helm(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return helm(c, *args, timeout_s=180)


def _pods(c: Cluster, ns: str) -> list[dict[str, Any]]:
    return [p for p in c.cp.pods(ns, OPERATOR) if not p["metadata"].get("deletionTimestamp")]


def _ready(pod: dict[str, Any]) -> bool:
    return any(x["type"] == "Ready" and x["status"] == "True"
               for x in pod["status"].get("conditions", []))


def _holder(c: Cluster, rel: Release) -> str:
    lease = c.cp.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{rel.ns}/leases/"
                                f"{rel.lease}", ok_missing=True) or {}
    return str((lease.get("spec") or {}).get("holderIdentity") or "").rsplit("_", 1)[0]


def _two_ready_one_leading(c: Cluster, rel: Release) -> tuple[str, str] | None:
    """(leader pod, standby pod) once both replicas run Ready on the node and one leads."""
    pods = _pods(c, rel.ns)
    if len(pods) != 2 or not all(_ready(p) for p in pods):
        return None
    byname = {p["metadata"]["name"] for p in pods}
    leader = _holder(c, rel)
    return (leader, (byname - {leader}).pop()) if leader in byname else None


def _diagnose(c: Cluster, ns: str) -> str:
    out = []
    for p in c.cp.pods(ns, OPERATOR):
        name = p["metadata"]["name"]
        logs = kubectl(c, "logs", "-n", ns, name, "--tail=20").stdout
        out.append(f"{name}: {p['status'].get('phase')} "
                   f"{[(x['type'], x['status']) for x in p['status'].get('conditions', [])]}"
                   f" {p['status'].get('containerStatuses')}\n{logs}")
    return "\n".join(out)[-6000:]


def _wait(c: Cluster, rel: Release, what: str, probe: Any, timeout_s: float) -> Any:
    try:
        return c.cp.wait_for(what, probe, timeout_s, 0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_diagnose(c, rel.ns)}") from e


def _ftj(name: str) -> dict[str, Any]:
    doc = example(name)
    doc["spec"].setdefault("resources", {})["gpu_class"] = "80GB"  # stays Pending here
    return doc


def _jobs_by_ftj(c: Cluster, ns: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for j in c.cp.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]:
        out.setdefault(j["metadata"]["labels"][names.LABEL_JOB], []).append(j["metadata"]["name"])
    return out


def _planned(c: Cluster, ns: str, wanted: set[str]) -> bool:
    items = c.cp.request("GET", ftj_path(ns))["items"]
    done = {i["metadata"]["name"] for i in items
            if (i.get("status") or {}).get("phase") == "Planned"
            and (i.get("status") or {}).get("jobName")}
    return wanted <= done


@pytest.fixture(scope="module")
def release(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    """The chart as a platform team installs it: two replicas (hostNetwork, so both on the
    node's network), leader election on."""
    tmp = tmp_path_factory.mktemp("operator-release")
    ns = cluster.cp.create_namespace("platform")
    cluster.cp.wait_for(f"ServiceAccount default in {ns}", lambda: cluster.cp.request(
        "GET", f"/api/v1/namespaces/{ns}/serviceaccounts/default", ok_missing=True), 60)
    assert cluster.image
    repo, tag = cluster.image.rsplit(":", 1)
    values = {
        "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
        "operator": {
            "replicas": 2, "hostNetwork": True, "port": _free_run(3),
            "bindAddress": "127.0.0.1", "resyncSeconds": 30,
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                             "effect": "NoSchedule"}],
            # No kube-proxy on this node: the in-cluster client goes to the API server on the
            # node's loopback, where a hostNetwork pod reaches it.
            "extraEnv": [
                {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                {"name": "KUBERNETES_SERVICE_PORT", "value": cluster.cp.url.rsplit(":", 1)[1]},
                {"name": "QLORA_OPERATOR_LEASE_DURATION_S", "value": f"{LEASE_S:g}"},
                {"name": "QLORA_OPERATOR_RENEW_DEADLINE_S", "value": f"{RENEW_S:g}"},
                {"name": "QLORA_OPERATOR_RETRY_PERIOD_S", "value": f"{RETRY_S:g}"},
            ],
        },
        "jobs": {"hostNetwork": True},
    }
    values_file = tmp / "values.yaml"
    values_file.write_text(yaml.safe_dump(values), encoding="utf-8")
    out = _helm(cluster, "install", RELEASE, str(REPO / "helm" / "qlora-runner"),
                "--namespace", ns, "-f", str(values_file))
    assert out.returncode == 0, out.stderr
    rel = Release(ns=ns, lease=f"{RELEASE}-qlora-runner", values=values_file)
    try:
        yield rel
    finally:
        _helm(cluster, "uninstall", RELEASE, "--namespace", ns)
        cluster.cp.request("DELETE", ftj_path(ns), {})
        cluster.cp.clear_namespace(ns)
        remove_kept_crd(cluster)


@pytest.mark.timeout(420)
def test_the_standby_runs_and_a_replica_takes_over_when_the_leaders_pod_is_deleted(
    cluster: Cluster, release: Release,
) -> None:
    c, rel = cluster, release
    leader, _standby = _wait(c, rel, "two replicas Ready on the one node, one leading",
                            lambda: _two_ready_one_leading(c, rel), 240)
    c.cp.request("POST", ftj_path(rel.ns), _ftj("before"))
    _wait(c, rel, "before Planned", lambda: _planned(c, rel.ns, {"before"}), 60)

    # `kubectl delete pod` of the leader: SIGTERM, the leader releases the Lease on its way.
    t0 = time.monotonic()
    deleted = kubectl(c, "delete", "pod", "-n", rel.ns, leader, "--wait=false")
    assert deleted.returncode == 0, deleted.stderr
    c.cp.request("POST", ftj_path(rel.ns), _ftj("after-delete"))
    # The leader releases the Lease on SIGTERM; the first candidate to try next takes it: the
    # standby (every retry period), or the Deployment's replacement pod, which campaigns as
    # soon as it starts and sometimes wins that race (seen on this node). Either way another
    # replica leads within the bound and nothing is reconciled twice.
    _wait(c, rel, "another replica to lead", lambda: _holder(c, rel) not in (None, "", leader),
          LEASE_S + 2 * RETRY_S + RECONCILE_S)
    new_leader = _holder(c, rel)
    _wait(c, rel, "after-delete Planned", lambda: _planned(c, rel.ns, {"after-delete"}), 60)
    took = time.monotonic() - t0
    assert took < LEASE_S + RETRY_S * 1.2 + RECONCILE_S, f"takeover took {took:.1f} s"

    # The Deployment replaces the deleted pod; the replacement stands by beside the leader.
    again = _wait(c, rel, "a standby Ready beside the new leader", lambda: (
        lambda s: s if s and s[0] == new_leader and leader not in s else None)(
            _two_ready_one_leading(c, rel)), 180)
    assert again[0] == new_leader and again[1] != leader
    jobs = _jobs_by_ftj(c, rel.ns)
    assert {k: len(v) for k, v in jobs.items()} == {"before": 1, "after-delete": 1}, jobs


def _host_pid(pod: str) -> int:
    """The host pid of the operator process of ``pod`` (runc shares the host's /proc view;
    the chart gives the process its pod's name in POD_NAME)."""
    mark = f"POD_NAME={pod}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if mark in env and b"operator" in cmd:  # the argument itself, not an exec probe
            return int(proc.name)
    raise AssertionError(f"no operator process of pod {pod} on this host")


@pytest.mark.timeout(300)
def test_the_standby_takes_over_within_the_lease_when_the_leaders_process_is_killed(
    cluster: Cluster, release: Release,
) -> None:
    c, rel = cluster, release
    leader, standby = _wait(c, rel, "two replicas Ready, one leading",
                            lambda: _two_ready_one_leading(c, rel), 240)
    t0 = time.monotonic()
    os.kill(_host_pid(leader), signal.SIGKILL)  # no release: the Lease must run out
    c.cp.request("POST", ftj_path(rel.ns), _ftj("after-kill"))
    _wait(c, rel, "the standby to lead", lambda: _holder(c, rel) == standby,
          LEASE_S + 2 * RETRY_S + RECONCILE_S)
    _wait(c, rel, "after-kill Planned", lambda: _planned(c, rel.ns, {"after-kill"}), 60)
    took = time.monotonic() - t0
    assert took < LEASE_S + RETRY_S * 1.2 + RECONCILE_S, f"takeover took {took:.1f} s"
    # The kubelet restarts the killed container in the same pod; it stands by now.
    again = _wait(c, rel, "the restarted replica Ready as standby", lambda: (
        lambda s: s if s and s[0] == standby else None)(_two_ready_one_leading(c, rel)), 180)
    assert again[1] == leader
    restarts = {p["metadata"]["name"]: sum(x.get("restartCount", 0) for x in
                                           p["status"].get("containerStatuses", []))
                for p in _pods(c, rel.ns)}
    assert restarts[leader] >= 1, restarts
    jobs = _jobs_by_ftj(c, rel.ns)
    assert len(jobs["after-kill"]) == 1, jobs


@pytest.mark.timeout(480)
def test_helm_upgrade_while_finetunejobs_are_created_loses_none_and_makes_none_twice(
    cluster: Cluster, release: Release,
) -> None:
    c, rel = cluster, release
    _wait(c, rel, "two replicas Ready, one leading", lambda: _two_ready_one_leading(c, rel), 240)
    old_pods = {p["metadata"]["name"] for p in _pods(c, rel.ns)}
    wanted = {f"burst-{i:02d}" for i in range(16)}
    failures: list[str] = []

    def create() -> None:
        for name in sorted(wanted):
            try:
                c.cp.request("POST", ftj_path(rel.ns), _ftj(name))
            except Exception as e:  # reported by the assertion below
                failures.append(f"{name}: {e}")
            time.sleep(1.0)

    creator = threading.Thread(target=create, daemon=True)
    creator.start()
    time.sleep(2.0)
    # A new pod template (as a new image or setting would): a rolling update of 2 replicas
    # with a surge pod, all three on the one node's network.
    up = _helm(c, "upgrade", RELEASE, str(REPO / "helm" / "qlora-runner"), "--namespace",
               rel.ns, "-f", str(rel.values), "--set-string",
               "operator.podAnnotations.rollout=2")
    assert up.returncode == 0, up.stderr

    # `qlora status -A` during the burst and the rollout.
    env = {"PATH": "/usr/bin:/bin", "KUBECONFIG": str(c.kubeconfig), "HOME": "/tmp"}
    shown = subprocess.run([sys.executable, "-m", "runner", "status", "-A"], env=env,
                           cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0].split()[:3] == ["NAMESPACE", "NAME", "PHASE"]
    assert any(ln.split()[:2] == [rel.ns, "burst-00"] for ln in shown.stdout.splitlines())

    def rolled() -> bool:
        d = c.cp.request("GET", f"/apis/apps/v1/namespaces/{rel.ns}/deployments/"
                                f"{RELEASE}-qlora-runner")
        st = d.get("status") or {}
        return (st.get("observedGeneration", 0) >= d["metadata"]["generation"]
                and st.get("updatedReplicas") == st.get("readyReplicas") == 2
                and st.get("replicas") == 2)

    _wait(c, rel, "the rollout to finish", rolled, 300)
    creator.join(timeout=60)
    assert not failures, failures
    _wait(c, rel, "every FineTuneJob Planned", lambda: _planned(c, rel.ns, wanted), 120)
    new = _wait(c, rel, "a new pod leading", lambda: _two_ready_one_leading(c, rel), 60)
    assert not set(new) & old_pods, (new, old_pods)  # the old ones are gone, a new one leads
    jobs = _jobs_by_ftj(c, rel.ns)
    assert {k: len(v) for k, v in jobs.items() if k in wanted} == dict.fromkeys(wanted, 1), jobs
