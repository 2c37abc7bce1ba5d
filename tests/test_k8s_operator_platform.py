"""The operator as a platform service, on the real control plane (etcd, kube-apiserver,
scheduler, controller-manager 1.20): leader election between real ``qlora operator``
processes, backoff of a failing FineTuneJob, watches across API server and etcd restarts, a
410 relist, ResourceQuota waits, a namespace-scoped install checked by impersonation, and
``qlora status`` listing."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from runner.k8s import names
from runner.k8s.api import FINETUNEJOBS, KubeApi, Obj, Resource
from runner.k8s.client import load_client
from runner.k8s.informer import Informer
from runner.k8s.operator import LEADER_ELECTION_RULES, RBAC_RULES, Operator
from runner.k8s.status import termination_message
from runner.plan import Plan, make_plan
from runner.settings import Settings
from runner.spec import JobSpec
from tests.fixtures.kube import ControlPlane
from tests.test_k8s_operator import (  # noqa: F401 - fixture reuse
    crd,
    create_ftj,
    example,
    ftj_path,
    wait_status,
)
from tests.test_k8s_rbac import PLURALS, _can, _user

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(240)]

FAST_LEASE = {  # lease 4 s, renew deadline 3 s, retry 1 s: the defaults' shape, quicker
    "QLORA_OPERATOR_LEASE_DURATION_S": "4",
    "QLORA_OPERATOR_RENEW_DEADLINE_S": "3",
    "QLORA_OPERATOR_RETRY_PERIOD_S": "1",
}


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()
    except OSError as e:
        return 0, str(e)


class OperatorProcess:
    """A real ``qlora operator`` process with its log drained in the background."""

    def __init__(self, cp: ControlPlane, ns: str, name: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
        env.update(KUBECONFIG=str(cp.kubeconfig), QLORA_NAMESPACE=ns, HOSTNAME=name,
                   QLORA_OPERATOR_METRICS_PORT="0", QLORA_OPERATOR_BIND_ADDRESS="127.0.0.1",
                   **FAST_LEASE)
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "--log-format", "json", "operator", "--resync", "5"],
            env=env, text=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        self.records: list[dict[str, Any]] = []
        self.port = 0
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith("{"):
                rec = json.loads(line)
                self.records.append(rec)
                if rec.get("msg") == "operator endpoint listening":
                    self.port = int(rec["port"])

    def metric(self, name: str) -> float | None:
        if not self.port:
            return None
        code, body = _get(f"http://127.0.0.1:{self.port}/metrics")
        for line in body.splitlines() if code == 200 else []:
            if line.split(" ")[0] == name:
                return float(line.split(" ")[1])
        return None

    def ready(self) -> str | None:
        code, body = _get(f"http://127.0.0.1:{self.port}/readyz") if self.port else (0, "")
        return body.strip() if code == 200 else None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self._reader.join(timeout=5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()


@pytest.fixture()
def operators(kube_control_plane: ControlPlane, crd: None,  # noqa: F811
              kube_namespace: str) -> Iterator[list[OperatorProcess]]:
    procs = [OperatorProcess(kube_control_plane, kube_namespace, f"op-{i}") for i in range(2)]
    yield procs
    for p in procs:
        p.stop(signal.SIGKILL)


def _lease(cp: ControlPlane, ns: str) -> dict[str, Any]:
    got = cp.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/"
                            "qlora-operator", ok_missing=True)
    return dict((got or {}).get("spec") or {})


def test_one_replica_leads_and_the_standby_takes_over_when_it_is_killed(
    kube_control_plane: ControlPlane, kube_namespace: str, operators: list[OperatorProcess],
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    # Both replicas become Ready (a standby too: a rolling update waits for that), one leads.
    # Both report "standby" until one has won the Lease, so wait for the leader as well.
    def _states() -> list[str] | None:
        states = sorted(p.ready() or "" for p in operators)
        return states if all(states) and "ok: leader" in states else None

    states = cp.wait_for("both replicas ready, one leading", _states, timeout_s=60)
    assert states == ["ok: leader", "ok: standby"]
    leader = next(p for p in operators if p.ready() == "ok: leader")
    standby = next(p for p in operators if p is not leader)
    assert _lease(cp, ns)["holderIdentity"].startswith(leader.name + "_")
    assert (leader.metric("qlora_operator_leader"), standby.metric("qlora_operator_leader")) \
        == (1.0, 0.0)
    create_ftj(cp, ns, example("before"))
    wait_status(cp, ns, "before", "Planned", timeout_s=30)
    time.sleep(1.5)  # the standby reconciles nothing, however many events it sees
    ok_count = 'qlora_operator_reconcile_duration_seconds_count{result="ok"}'
    assert (leader.metric(ok_count) or 0) >= 1 and standby.metric(ok_count) == 0

    # kill -9: no release, so the standby waits out the lease duration (4 s) as it saw it.
    transitions = int(_lease(cp, ns).get("leaseTransitions") or 0)
    killed_at = time.monotonic()
    leader.stop(signal.SIGKILL)
    create_ftj(cp, ns, example("after-kill"))
    wait_status(cp, ns, "after-kill", "Planned", timeout_s=30)
    took = time.monotonic() - killed_at
    assert took < 4 + 1 * 1.2 + 5, f"takeover took {took:.1f} s"  # lease + retry + a reconcile
    lease = _lease(cp, ns)
    assert lease["holderIdentity"].startswith(standby.name + "_")
    assert int(lease["leaseTransitions"]) == transitions + 1
    assert standby.ready() == "ok: leader" and standby.metric("qlora_operator_leader") == 1.0
    jobs = cp.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]
    assert sorted(j["metadata"]["labels"][names.LABEL_JOB] for j in jobs) == \
        ["after-kill", "before"]  # each FineTuneJob has one Job: nothing made twice

    # SIGTERM (a deleted pod, a rolling update): the leader releases the Lease on its way out.
    assert standby.stop(signal.SIGTERM) == 0
    assert _lease(cp, ns)["holderIdentity"] == ""


def test_a_finetunejob_that_keeps_failing_backs_off_and_blocks_no_other(
    kube_control_plane: ControlPlane, crd: None, kube_namespace: str,  # noqa: F811
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    calls: list[float] = []

    def planner(spec: JobSpec, settings: Settings) -> Plan:
        if spec.metadata.name == "broken":
            calls.append(time.monotonic())
            raise RuntimeError("a bug in the planner")  # not a RunnerError: the worst case
        return make_plan(spec, settings)

    settings = Settings(operator_retry_base_delay_s=0.5, operator_workers=2)
    op = Operator(load_client(str(cp.kubeconfig)), settings, namespace=ns, resync_s=300,
                  planner=planner)
    t = threading.Thread(target=op.run, kwargs={"max_seconds": 60}, daemon=True)
    t.start()
    try:
        create_ftj(cp, ns, example("broken"))
        cp.wait_for("the first failure", lambda: calls, timeout_s=30)
        for i in range(6):
            create_ftj(cp, ns, example(f"fine-{i}"))
        for i in range(6):
            wait_status(cp, ns, f"fine-{i}", "Planned", timeout_s=30)
        time.sleep(max(0.0, calls[0] + 8 - time.monotonic()))
        window = [c for c in calls if c <= calls[0] + 8]
        # 0.5, 1, 2, 4 s apart: 4 or 5 tries in 8 s (a hot loop would make hundreds)
        assert 3 <= len(window) <= 6, [round(c - calls[0], 2) for c in calls]
        gaps = [b - a for a, b in itertools.pairwise(calls)]
        # each try waits at least its backoff (a busy machine may add to it, never take off)
        assert all(g >= 0.5 * 2**i * 0.9 for i, g in enumerate(gaps)), gaps
        assert (op.metrics.value("qlora_operator_queue_retries_total") or 0) >= len(window) - 1
        assert (op.metrics.value("qlora_operator_reconcile_errors_total") or 0) >= len(window)
        assert "status" not in cp.request("GET", ftj_path(ns, "broken"))
    finally:
        op.stop()
        t.join(timeout=20)


def test_no_more_finetunejobs_are_reconciled_at_once_than_there_are_workers(
    kube_control_plane: ControlPlane, crd: None, kube_namespace: str,  # noqa: F811
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    lock, now, most = threading.Lock(), [0], [0]

    def slow_planner(spec: JobSpec, settings: Settings) -> Plan:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.8)  # a reconcile that takes a while: the others must wait for a worker
        with lock:
            now[0] -= 1
        return make_plan(spec, settings)

    op = Operator(load_client(str(cp.kubeconfig)), Settings(operator_workers=2), namespace=ns,
                  resync_s=300, planner=slow_planner)
    for i in range(6):
        create_ftj(cp, ns, example(f"w-{i}"))
    t = threading.Thread(target=op.run, kwargs={"max_seconds": 90}, daemon=True)
    t.start()
    try:
        for i in range(6):
            wait_status(cp, ns, f"w-{i}", "Planned", timeout_s=60)
        assert most[0] == 2, most  # two at once (and never three)
    finally:
        op.stop()
        t.join(timeout=20)


def _jobs_by_ftj(cp: ControlPlane, ns: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for j in cp.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]:
        out.setdefault(j["metadata"]["labels"][names.LABEL_JOB], []).append(j["metadata"]["name"])
    return out


def _owned_uids(cp: ControlPlane, ns: str) -> dict[str, str]:
    """``kind/name -> uid`` of every Job and ConfigMap the operator made: a uid that changes
    is an object deleted and made again."""
    out: dict[str, str] = {}
    for kind, path in (("job", "/apis/batch/v1"), ("configmap", "/api/v1")):
        plural = "jobs" if kind == "job" else "configmaps"
        for o in cp.request("GET", f"{path}/namespaces/{ns}/{plural}?labelSelector="
                                   f"{names.LABEL_MANAGED_BY}%3Dqlora-operator")["items"]:
            out[f"{kind}/{o['metadata']['name']}"] = o["metadata"]["uid"]
    return out


def _phases(cp: ControlPlane, ns: str) -> dict[str, str]:
    return {i["metadata"]["name"]: (i.get("status") or {}).get("phase", "")
            for i in cp.request("GET", ftj_path(ns))["items"]}


def _succeed(cp: ControlPlane, ns: str, name: str, uri: str) -> None:
    pod = cp.wait_for_bound_pod(ns, f"{names.LABEL_JOB}={name}")
    cp.play_kubelet(ns, pod["metadata"]["name"], phase="Succeeded",
                    message=termination_message(succeeded=True, adapter_uri=uri))


def test_nothing_is_lost_when_kube_apiserver_and_then_etcd_restart(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], crd: None,  # noqa: F811
    kube_namespace: str,
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    op = Operator(load_client(str(cp.kubeconfig)), Settings(operator_retry_max_delay_s=2),
                  namespace=ns, resync_s=300)  # no resync: the watches must carry it
    t = threading.Thread(target=op.run, kwargs={"max_seconds": 200}, daemon=True)
    t.start()
    try:
        for name in ("a", "b", "c"):
            create_ftj(cp, ns, example(name))
        for name in ("a", "b", "c"):
            wait_status(cp, ns, name, "Planned", timeout_s=60)
        before = _owned_uids(cp, ns)
        assert len(before) == 6, before  # a Job and a ConfigMap each

        cp.restart("kube-apiserver", down_s=2)
        # Right after the restart, before anything else happens: every status is still there.
        assert _phases(cp, ns) == dict.fromkeys("abc", "Planned")
        _succeed(cp, ns, "a", "s3://x/a")  # happens while the watches reconnect
        create_ftj(cp, ns, example("d"))
        assert wait_status(cp, ns, "a", "Succeeded", timeout_s=60)["adapterURI"] == "s3://x/a"
        wait_status(cp, ns, "d", "Planned", timeout_s=60)

        cp.restart("etcd", down_s=3)
        assert _phases(cp, ns) == {"a": "Succeeded", "b": "Planned", "c": "Planned",
                                   "d": "Planned"}
        _succeed(cp, ns, "b", "s3://x/b")
        create_ftj(cp, ns, example("e"))
        assert wait_status(cp, ns, "b", "Succeeded", timeout_s=90)["adapterURI"] == "s3://x/b"
        wait_status(cp, ns, "e", "Planned", timeout_s=90)

        phases = {n: cp.request("GET", ftj_path(ns, n))["status"]["phase"] for n in "abcde"}
        assert phases == {"a": "Succeeded", "b": "Succeeded", "c": "Planned", "d": "Planned",
                          "e": "Planned"}
        jobs = _jobs_by_ftj(cp, ns)
        assert {k: len(v) for k, v in jobs.items()} == dict.fromkeys("abcde", 1), jobs
        after = _owned_uids(cp, ns)  # nothing deleted and made again, nothing deleted at all
        assert {k: after.get(k) for k in before} == before
        assert len(after) == 10, after
        restarts = op.metrics.value("qlora_operator_watch_restarts_total",
                                    resource="finetunejobs", reason="error") or 0
        assert restarts >= 1  # the watches really broke and came back
    finally:
        op.stop()
        t.join(timeout=20)


def test_a_missed_event_is_repaired_by_the_periodic_resync(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], crd: None,  # noqa: F811
    kube_namespace: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The operator goes deaf to its Jobs' and pods' events (as if a watch had dropped
    them): the pod's completion reaches the FineTuneJob through the resync alone."""
    from runner.k8s import controller as ctl

    cp, ns = kube_control_plane, kube_namespace
    missed: list[str] = []
    hear = ctl.Controller._on_event

    def deaf(self: ctl.Controller, etype: str, obj: Obj) -> None:
        if obj.get("apiVersion") != FINETUNEJOBS.api_version and (
                (obj.get("metadata") or {}).get("labels") or {}).get(names.LABEL_JOB):
            missed.append(f"{etype} {obj.get('kind')}")
            return
        hear(self, etype, obj)

    monkeypatch.setattr(ctl.Controller, "_on_event", deaf)
    resync = 4.0
    op = Operator(load_client(str(cp.kubeconfig)), Settings(), namespace=ns, resync_s=resync)
    t = threading.Thread(target=op.run, kwargs={"max_seconds": 120}, daemon=True)
    t.start()
    try:
        create_ftj(cp, ns, example("missed"))
        wait_status(cp, ns, "missed", "Planned", timeout_s=60)
        seen = len(missed)
        t0 = time.monotonic()
        _succeed(cp, ns, "missed", "s3://x/missed")
        st = wait_status(cp, ns, "missed", "Succeeded", timeout_s=60)
        took = time.monotonic() - t0
        assert st["adapterURI"] == "s3://x/missed"
        assert len(missed) > seen, missed  # the pod's and Job's events really went unheard
        assert took < resync + 10, f"repaired after {took:.1f} s"  # one resync + a reconcile
    finally:
        op.stop()
        t.join(timeout=20)


class StaleList:
    """The real API, except that its first list hands out resourceVersion 1, long compacted
    away: the next watch gets 410 Gone, as after an etcd compaction or a long outage."""

    def __init__(self, api: KubeApi) -> None:
        self.api, self.first = api, True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)

    def list_objects(self, res: Resource, namespace: str | None,
                     label_selector: str | None = None) -> tuple[list[Obj], str]:
        items, rv = self.api.list_objects(res, namespace, label_selector)
        if self.first:
            self.first = False
            return items, "1"
        return items, rv


def test_an_expired_resource_version_relists_and_reports_what_changed(
    kube_control_plane: ControlPlane, crd: None, kube_namespace: str,  # noqa: F811
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    create_ftj(cp, ns, example("old"))
    events: list[tuple[str, str]] = []
    api = StaleList(load_client(str(cp.kubeconfig)))
    inf = Informer(api, FINETUNEJOBS, ns, watch_timeout_s=5,  # type: ignore[arg-type]
                   handler=lambda e, o: events.append((e, o["metadata"]["name"])))
    stop = threading.Event()
    t = threading.Thread(target=inf.run, args=(stop,), daemon=True)
    t.start()
    try:
        cp.wait_for("the relist after 410", lambda: inf.relists >= 1, timeout_s=30)
        create_ftj(cp, ns, example("new"))
        cp.wait_for("the new object", lambda: inf.get(ns, "new"), timeout_s=30)
        assert ("ADDED", "old") in events and ("ADDED", "new") in events
        assert sorted(o["metadata"]["name"] for o in inf.items(ns)) == ["new", "old"]
    finally:
        stop.set()
        t.join(timeout=15)


def _quota(cp: ControlPlane, ns: str, hard: dict[str, str], used: dict[str, str]) -> None:
    """A ResourceQuota whose usage the test sets (the quota controller is not running)."""
    path = f"/api/v1/namespaces/{ns}/resourcequotas"
    if cp.request("GET", f"{path}/gpus", ok_missing=True) is None:
        cp.request("POST", path, {"metadata": {"name": "gpus"}, "spec": {"hard": hard}})
    cp.request("PATCH", f"{path}/gpus/status", {"status": {"hard": hard, "used": used}},
               content_type="application/merge-patch+json")


def test_a_full_quota_keeps_the_finetunejob_pending_without_retrying_hot(
    kube_control_plane: ControlPlane, crd: None, kube_namespace: str,  # noqa: F811
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    _quota(cp, ns, {"requests.nvidia.com/gpu": "2"}, {"requests.nvidia.com/gpu": "2"})
    op = Operator(load_client(str(cp.kubeconfig)), Settings(), namespace=ns, resync_s=300)
    t = threading.Thread(target=op.run, kwargs={"max_seconds": 100}, daemon=True)
    t.start()
    try:
        create_ftj(cp, ns, example("waits"))
        st = wait_status(cp, ns, "waits", "Pending", timeout_s=30)
        assert st["reason"] == "QuotaExceeded"
        running = next(c for c in st["conditions"] if c["type"] == "Running")
        assert (running["status"], running["reason"]) == ("False", "QuotaExceeded")
        assert "resourcequota" in st["message"] and "requests.nvidia.com/gpu 1 requested, " \
            "2 of 2 used" in st["message"]
        assert not any(c["type"] == "Failed" and c["status"] == "True" for c in st["conditions"])
        assert _jobs_by_ftj(cp, ns) == {}
        rv = cp.request("GET", ftj_path(ns, "waits"))["metadata"]["resourceVersion"]
        count = op.metrics.value("qlora_operator_reconcile_duration_seconds_count", result="ok")
        time.sleep(3)
        assert cp.request("GET", ftj_path(ns, "waits"))["metadata"]["resourceVersion"] == rv
        after = op.metrics.value("qlora_operator_reconcile_duration_seconds_count", result="ok")
        assert (after or 0) - (count or 0) <= 1  # waits for the quota to change, no timer
        _quota(cp, ns, {"requests.nvidia.com/gpu": "2"}, {"requests.nvidia.com/gpu": "1"})
        wait_status(cp, ns, "waits", "Planned", timeout_s=30)
        assert list(_jobs_by_ftj(cp, ns)) == ["waits"]
    finally:
        op.stop()
        t.join(timeout=20)


def test_a_namespace_scoped_install_sees_only_its_namespaces_with_roles_there(
    kube_control_plane: ControlPlane, crd: None,  # noqa: F811
) -> None:
    cp = kube_control_plane
    home, team_a, team_b, other = (cp.create_namespace(p) for p in ("op", "ta", "tb", "x"))
    sa = "qlora-operator"
    role_rules = [{"apiGroups": [g], "resources": [r], "verbs": list(v)} for g, r, v in RBAC_RULES]
    lease_rules = [{"apiGroups": [g], "resources": [r], "verbs": list(v),
                    **({"resourceNames": list(n)} if n else {})}
                   for g, r, v, n in LEADER_ELECTION_RULES]
    objs: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "ServiceAccount",
                                   "metadata": {"name": sa, "namespace": home}}]
    for ns, rules in ((team_a, role_rules), (team_b, role_rules), (home, lease_rules)):
        objs += [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "op", "namespace": ns}, "rules": rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "op", "namespace": ns},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "op"},
             "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": home}]},
        ]
    cp.apply_file_objects(objs, PLURALS)
    user = _user(home, sa)
    for ns in (team_a, team_b, other):
        create_ftj(cp, ns, example("tenant"))
    api = load_client(str(cp.kubeconfig), impersonate=user)
    settings = Settings(namespace=home, operator_namespaces=[team_a, team_b])
    op = Operator(api, settings, namespaces=settings.operator_namespaces, resync_s=300,
                  leader_election=True)
    t = threading.Thread(target=op.run, kwargs={"max_seconds": 100}, daemon=True)
    t.start()
    try:
        for ns in (team_a, team_b):
            wait_status(cp, ns, "tenant", "Planned", timeout_s=60)
        assert op.leading
        time.sleep(1)
        assert "status" not in cp.request("GET", ftj_path(other, "tenant"))  # not watched
        # Per-namespace S3 credentials: each Job reads the Secret of its own namespace by
        # secretKeyRef (no namespace field exists there), and the operator reads no Secret.
        for ns in (team_a, team_b):
            (job,) = cp.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]
            refs = [e["valueFrom"]["secretKeyRef"] for c in
                    job["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {})]
            assert refs and {r["name"] for r in refs} == {settings.s3_secret_name}
            assert all(set(r) <= {"name", "key", "optional"} for r in refs)
        for ns in (team_a, team_b, other, home):
            assert not _can(cp, user, ns, "get", "", "secrets")
            assert not _can(cp, user, ns, "list", "", "secrets")
        assert not _can(cp, user, other, "list", "qlora-runner.io", "finetunejobs")
        assert not _can(cp, user, other, "create", "batch", "jobs")
    finally:
        op.stop()
        t.join(timeout=20)
        for ns in (team_a, team_b):
            cp.clear_namespace(ns)
    assert _lease(cp, home)["holderIdentity"] == ""  # released on the way out


def test_qlora_status_lists_a_namespace_or_all_with_one_list_call(
    kube_control_plane: ControlPlane, crd: None, kube_namespace: str,  # noqa: F811
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    op = Operator(load_client(str(cp.kubeconfig)), Settings(), namespace=ns)
    for i in range(3):
        create_ftj(cp, ns, example(f"s-{i}"))
    bad = example("s-bad")
    bad["spec"]["training"]["micro_batch_size"] = 64
    create_ftj(cp, ns, bad)
    op.reconcile_all()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env["KUBECONFIG"] = str(cp.kubeconfig)
    out = subprocess.run([sys.executable, "-m", "runner", "status", "-n", ns], env=env,
                         text=True, capture_output=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "CLASS", "PROGRESS", "AGE"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert set(rows) == {"s-0", "s-1", "s-2", "s-bad"}
    assert rows["s-0"][1:3] == ["Planned", "24GB"] and rows["s-bad"][1:3] == ["Failed", "-"]
    assert rows["s-bad"][3] == "InvalidSpec" and rows["s-0"][-1].endswith("s")
    every = subprocess.run([sys.executable, "-m", "runner", "status", "-A"], env=env,
                           text=True, capture_output=True, timeout=60, check=False)
    assert every.returncode == 0, every.stderr
    assert every.stdout.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert f"{ns} " in every.stdout and "s-bad" in every.stdout
