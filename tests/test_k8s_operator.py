"""The FineTuneJob operator against a real control plane: it plans, creates owned objects, and
its status follows the Job that the real Job controller runs (the test plays the kubelet)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.k8s import names
from runner.k8s.api import ConflictError
from runner.k8s.client import KubeClient, load_client
from runner.k8s.crd import crd_manifest
from runner.k8s.operator import Operator
from runner.k8s.status import termination_message
from runner.settings import Settings
from tests.fixtures.kube import ControlPlane

pytestmark = [pytest.mark.k8s, pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parent.parent
SPEC_8B = REPO / "examples" / "llama-3.1-8b.yaml"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


@pytest.fixture(scope="module")
def crd(kube_control_plane: ControlPlane) -> None:
    """The FineTuneJob CRD, installed and Established."""
    cp = kube_control_plane
    manifest = crd_manifest()
    name = manifest["metadata"]["name"]
    if cp.request("GET", f"{CRD_PATH}/{name}", ok_missing=True) is None:
        cp.request("POST", CRD_PATH, manifest)

    def established() -> bool:
        got = cp.request("GET", f"{CRD_PATH}/{name}")
        return any(c["type"] == "Established" and c["status"] == "True"
                   for c in (got.get("status") or {}).get("conditions") or [])

    cp.wait_for("the FineTuneJob CRD to be established", established, timeout_s=30)


@pytest.fixture()
def operator(kube_control_plane: ControlPlane, crd: None,
             kube_namespace: str) -> Iterator[Operator]:
    """An operator watching the test's namespace, running in a thread."""
    api = load_client(str(kube_control_plane.kubeconfig))
    op = Operator(api, Settings(), namespace=kube_namespace, resync_s=5)
    t = threading.Thread(target=op.run, kwargs={"max_seconds": 200}, daemon=True)
    t.start()
    yield op
    op.stop()
    t.join(timeout=15)


def ftj_path(ns: str, name: str = "") -> str:
    base = f"/apis/qlora-runner.io/v1alpha1/namespaces/{ns}/finetunejobs"
    return f"{base}/{name}" if name else base


def create_ftj(cp: ControlPlane, ns: str, doc: dict[str, Any]) -> dict[str, Any]:
    return dict(cp.request("POST", ftj_path(ns), doc))


def example(name: str | None = None) -> dict[str, Any]:
    doc = yaml.safe_load(SPEC_8B.read_text())
    if name:
        doc["metadata"]["name"] = name
    return dict(doc)


def wait_status(cp: ControlPlane, ns: str, name: str, phase: str,
                timeout_s: float = 90) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        st = cp.request("GET", ftj_path(ns, name)).get("status") or {}
        return st if st.get("phase") == phase else None

    return dict(cp.wait_for(f"finetunejob {ns}/{name} to be {phase}", probe, timeout_s))


def cond(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == ctype)


def test_finetunejob_is_planned_run_and_succeeds_with_the_adapter_uri(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], kube_namespace: str,
    operator: Operator,
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    ftj = create_ftj(cp, ns, example())
    name = ftj["metadata"]["name"]
    planned = wait_status(cp, ns, name, "Planned")
    assert planned["gpuClass"] == "24GB" and planned["vramEstimate"].endswith("GiB")
    assert cond(planned, "Planned")["status"] == "True"

    job = cp.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{planned['jobName']}")
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "FineTuneJob", name, ftj["metadata"]["uid"], True)
    cm = cp.request("GET", f"/api/v1/namespaces/{ns}/configmaps/{planned['jobName']}")
    assert cm["metadata"]["ownerReferences"][0]["uid"] == ftj["metadata"]["uid"]

    pod = cp.wait_for_bound_pod(ns, f"{names.LABEL_JOB}={name}")
    cp.play_kubelet(ns, pod["metadata"]["name"], phase="Running")
    running = wait_status(cp, ns, name, "Running")
    assert cond(running, "Running")["status"] == "True"

    uri = "s3://adapters/llama31-8b-support/runs/r1"
    cp.play_kubelet(ns, pod["metadata"]["name"], phase="Succeeded",
                    message=termination_message(succeeded=True, adapter_uri=uri))
    done = wait_status(cp, ns, name, "Succeeded")
    assert done["adapterURI"] == uri
    assert cond(done, "Succeeded")["status"] == "True"
    assert cond(done, "Running")["status"] == "False"

    # Deleting the FineTuneJob takes its Job and ConfigMap with it (garbage collector; it
    # finds a newly installed CRD on its 30 s discovery resync, hence the long bound).
    cp.request("DELETE", ftj_path(ns, name))
    cp.wait_for("the owned job to be garbage-collected", lambda: cp.request(
        "GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{planned['jobName']}", ok_missing=True
    ) is None, timeout_s=120)


def test_an_invalid_finetunejob_gets_a_failed_condition_not_a_crash(
    kube_control_plane: ControlPlane, kube_namespace: str, operator: Operator
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    doc = example("bad-batch")
    doc["spec"]["training"]["micro_batch_size"] = 64  # > target_effective_batch_size 16
    create_ftj(cp, ns, doc)
    failed = wait_status(cp, ns, "bad-batch", "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.training" in failed["message"] and "micro_batch_size 64" in failed["message"]
    assert cond(failed, "Failed")["reason"] == "InvalidSpec"
    jobs = cp.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]
    assert jobs == []
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env["KUBECONFIG"] = str(cp.kubeconfig)
    shown = subprocess.run([sys.executable, "-m", "runner", "status", "bad-batch", "-n", ns],
                           env=env, text=True, capture_output=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("finetunejob/bad-batch: Failed") and "micro_batch_size 64" \
        in shown.stdout

    # Fixing the spec (a new generation) recovers it: level-triggered, nothing remembered.
    fixed = cp.request("GET", ftj_path(ns, "bad-batch"))
    fixed["spec"]["training"]["micro_batch_size"] = 4
    cp.request("PUT", ftj_path(ns, "bad-batch"), fixed)
    planned = wait_status(cp, ns, "bad-batch", "Planned")
    assert planned["reason"] == "Planned"
    assert all(c["status"] == "False" for c in planned["conditions"] if c["type"] == "Failed")


def test_out_of_memory_replans_with_a_smaller_micro_batch(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], kube_namespace: str,
    operator: Operator,
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    create_ftj(cp, ns, example("oom"))
    first = wait_status(cp, ns, "oom", "Planned")
    pod = cp.wait_for_bound_pod(ns, f"{names.LABEL_JOB}=oom")
    job = pod["metadata"]["labels"]["job-name"]
    # podFailurePolicy (FailJob on exit 6) is newer than this API server: stand in for it.
    cp.request("PATCH", f"/apis/batch/v1/namespaces/{ns}/jobs/{job}", {"spec": {"backoffLimit": 0}},
               content_type="application/merge-patch+json")
    cp.play_kubelet(ns, pod["metadata"]["name"], phase="Failed", exit_code=6,
                    message=termination_message(succeeded=False, reason="CUDA out of memory",
                                                exit_code=6))

    def replanned() -> dict[str, Any] | None:
        st = cp.request("GET", ftj_path(ns, "oom")).get("status") or {}
        return st if st.get("retries") == 1 and st.get("jobName") != first["jobName"] else None

    second = cp.wait_for("a re-planned job", replanned, timeout_s=90)
    assert second["jobName"].endswith("-r1")
    assert cond(second, "Planned")["reason"] == "Replanned"
    cm = cp.request("GET", f"/api/v1/namespaces/{ns}/configmaps/{second['jobName']}")
    plan = yaml.safe_load(cm["data"]["plan.json"])
    first_cm = cp.request("GET", f"/api/v1/namespaces/{ns}/configmaps/{first['jobName']}")
    first_plan = yaml.safe_load(first_cm["data"]["plan.json"])
    assert plan["micro_batch_size"] * 2 == first_plan["micro_batch_size"]
    assert plan["gradient_accumulation_steps"] == 2 * first_plan["gradient_accumulation_steps"]


def test_a_restarted_operator_resumes_from_the_cluster(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], crd: None, kube_namespace: str
) -> None:
    """No operator runs while the FineTuneJob is created and its pod finishes; one pass of a
    fresh operator (``qlora operator --once`` does the same) brings the status up to date."""
    cp, ns = kube_control_plane, kube_namespace
    api: KubeClient = load_client(str(cp.kubeconfig))
    create_ftj(cp, ns, example("resume"))
    Operator(api, Settings(), namespace=ns).reconcile_all()  # operator #1: one pass, then gone
    st = cp.request("GET", ftj_path(ns, "resume"))["status"]
    assert st["phase"] == "Planned"
    pod = cp.wait_for_bound_pod(ns, f"{names.LABEL_JOB}=resume")
    cp.play_kubelet(ns, pod["metadata"]["name"], phase="Running")
    cp.play_kubelet(ns, pod["metadata"]["name"], phase="Succeeded",
                    message=termination_message(succeeded=True, adapter_uri="file:///a/b"))
    cp.wait_for("the job to complete", lambda: any(
        c["type"] == "Complete" for c in (cp.request(
            "GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{st['jobName']}"
        ).get("status") or {}).get("conditions", [])), timeout_s=60)
    fresh = Operator(load_client(str(cp.kubeconfig)), Settings(), namespace=ns)
    fresh.reconcile_all()  # operator #2 knows nothing but what the cluster says
    done = cp.request("GET", ftj_path(ns, "resume"))["status"]
    assert done["phase"] == "Succeeded" and done["adapterURI"] == "file:///a/b"
    jobs = cp.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]
    assert [j["metadata"]["name"] for j in jobs] == [st["jobName"]]  # nothing created twice
    again = copy.deepcopy(done)
    fresh.reconcile_all()  # idempotent: nothing changes on a second pass
    assert cp.request("GET", ftj_path(ns, "resume"))["status"] == again


def test_a_stale_status_write_is_a_conflict_and_is_retried_on_fresh_state(
    kube_control_plane: ControlPlane, crd: None, kube_namespace: str
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    stale = create_ftj(cp, ns, example("stale"))
    cp.request("PATCH", ftj_path(ns, "stale"), {"metadata": {"labels": {"team": "a"}}},
               content_type="application/merge-patch+json")  # someone else moved it on
    op = Operator(load_client(str(cp.kubeconfig)), Settings(), namespace=ns)
    with pytest.raises(ConflictError, match="conflict"):
        op.reconcile(stale)
    op.reconcile_all()  # reads again, reconciles, writes
    assert cp.request("GET", ftj_path(ns, "stale"))["status"]["phase"] == "Planned"


def test_qlora_operator_cli_runs_bounded_and_logs_json(
    kube_control_plane: ControlPlane, crd: None, kube_namespace: str
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    create_ftj(cp, ns, example("cli"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update(KUBECONFIG=str(cp.kubeconfig), QLORA_NAMESPACE=ns, **ENDPOINT_ENV)
    res = subprocess.run([sys.executable, "-m", "runner", "operator", "--max-seconds", "4"],
                         env=env, text=True, capture_output=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    assert any(r["msg"] == "operator started" and r["namespace"] == ns for r in records)
    assert any(r.get("phase") == "Planned" for r in records), res.stderr
    assert cp.request("GET", ftj_path(ns, "cli"))["status"]["phase"] == "Planned"
    once = subprocess.run([sys.executable, "-m", "runner", "operator", "--once"], env=env,
                          text=True, capture_output=True, timeout=60, check=False)
    assert once.returncode == 0, once.stderr


def test_editing_the_spec_replaces_the_running_job(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], kube_namespace: str,
    operator: Operator,
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    create_ftj(cp, ns, example("edit"))
    first = wait_status(cp, ns, "edit", "Planned")
    pod = cp.wait_for_bound_pod(ns, f"{names.LABEL_JOB}=edit")
    cp.play_kubelet(ns, pod["metadata"]["name"], phase="Running")
    wait_status(cp, ns, "edit", "Running")

    ftj = cp.request("GET", ftj_path(ns, "edit"))
    ftj["spec"]["lora"]["r"] = 32
    cp.request("PUT", ftj_path(ns, "edit"), ftj)

    def replaced() -> dict[str, Any] | None:
        st = cp.request("GET", ftj_path(ns, "edit")).get("status") or {}
        return st if st.get("jobName") not in (None, first["jobName"]) else None

    second = cp.wait_for("a job for the edited spec", replaced, timeout_s=60)
    assert second["observedGeneration"] == 2 and second["specHash"] != first["specHash"]
    cp.wait_for("the outdated running job to be deleted", lambda: cp.request(
        "GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{first['jobName']}", ok_missing=True
    ) is None, timeout_s=30)


def test_qlora_operator_stops_cleanly_on_sigterm(
    kube_control_plane: ControlPlane, crd: None, kube_namespace: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_")}
    env.update(KUBECONFIG=str(kube_control_plane.kubeconfig), QLORA_NAMESPACE=kube_namespace,
               **ENDPOINT_ENV)
    proc = subprocess.Popen([sys.executable, "-m", "runner", "operator"], env=env, text=True,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        assert proc.stderr is not None
        port = 0
        for line in proc.stderr:  # bounded by the test timeout
            if "operator endpoint listening" in line:
                port = int(json.loads(line)["port"])
            if "operator started" in line:
                break
        # The kubelet's probes and Prometheus' scrape, on the process's real endpoint.
        url = f"http://127.0.0.1:{port}"
        assert _get(url + "/healthz") == (200, "ok: alive\n")
        ready = kube_control_plane.wait_for("/readyz to answer 200", lambda: (
            _get(url + "/readyz")[0] == 200), timeout_s=30)
        assert ready
        code, metrics = _get(url + "/metrics")
        assert code == 200 and "qlora_operator_reconcile_duration_seconds_bucket" in metrics
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, rest
    assert "operator stopped" in rest


ENDPOINT_ENV = {"QLORA_OPERATOR_METRICS_PORT": "0", "QLORA_OPERATOR_BIND_ADDRESS": "127.0.0.1"}


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


def test_a_failed_job_shows_in_the_finetunejob_with_its_reason(
    kube_control_plane: ControlPlane, gpu_nodes: dict[str, str], kube_namespace: str,
    operator: Operator,
) -> None:
    cp, ns = kube_control_plane, kube_namespace
    create_ftj(cp, ns, example("fails"))
    wait_status(cp, ns, "fails", "Planned")
    pod = cp.wait_for_bound_pod(ns, f"{names.LABEL_JOB}=fails")
    job = pod["metadata"]["labels"]["job-name"]
    # podFailurePolicy (FailJob on exit 2) is newer than this API server: stand in for it.
    cp.request("PATCH", f"/apis/batch/v1/namespaces/{ns}/jobs/{job}", {"spec": {"backoffLimit": 0}},
               content_type="application/merge-patch+json")
    cp.play_kubelet(ns, pod["metadata"]["name"], phase="Failed", exit_code=2,
                    message=termination_message(succeeded=False, exit_code=2,
                                                reason="dataset.sources[0]: 0 rows"))
    failed = wait_status(cp, ns, "fails", "Failed")
    # The operator's own stand-in for the policy (runner/k8s/exit_policy.py) or the Job
    # controller's backoff limit, whichever sees the failed pod first.
    assert failed["reason"] in ("PodFailurePolicy", "BackoffLimitExceeded")
    assert failed["message"] == "dataset.sources[0]: 0 rows (exit code 2)"
    assert cond(failed, "Failed")["status"] == "True"
    assert failed.get("retries") == 0 and "completionTime" in failed


def test_an_unreadable_model_config_is_pending_with_the_reason(
    kube_control_plane: ControlPlane, crd: None, kube_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planner reads the model's config.json from S3; without credentials (an operator
    pod without the S3 Secret) the FineTuneJob says so instead of staying blank."""
    cp, ns = kube_control_plane, kube_namespace
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
                "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    api = load_client(str(cp.kubeconfig))
    op = Operator(api, Settings(s3_endpoint_url="http://127.0.0.1:9", storage_retries=0),
                  namespace=ns, resync_s=5)
    t = threading.Thread(target=op.run, kwargs={"max_seconds": 60}, daemon=True)
    t.start()
    try:
        doc = example("no-creds")
        doc["spec"]["model"]["source"] = "s3://models/some-model"
        create_ftj(cp, ns, doc)
        pending = wait_status(cp, ns, "no-creds", "Pending", timeout_s=40)
    finally:
        op.stop()
        t.join(timeout=15)
    assert pending["reason"] == "ModelConfigUnreadable"
    assert "s3://models/some-model/config.json" in pending["message"], pending["message"]
    assert cond(pending, "Planned")["status"] == "False"
    assert cp.request("GET", f"/apis/batch/v1/namespaces/{ns}/jobs")["items"] == []
